# syntax=docker/dockerfile:1
# compute-bridge container: build with the toolchain better-sqlite3 needs, run on slim Node 24 (LTS).
#   docker build -t compute-bridge .
#   docker run -d --name compute-bridge -p 8787:8787 -p 9464:9464 \
#     -v /etc/compute-bridge:/etc/compute-bridge:ro -v compute-bridge-state:/var/lib/compute-bridge \
#     compute-bridge
# No secret is baked in: the config and the secret files it references are mounted at run time.

FROM node:24-bookworm AS build
WORKDIR /src
# python3, make and g++ (node-gyp builds better-sqlite3 where no prebuilt binary fits) come with the
# full bookworm image; outside a container install them yourself (docs/operations.md).
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
COPY scripts/build.mjs ./scripts/build.mjs
COPY src ./src
COPY bin ./bin
# `npm ci` runs `prepare`, which compiles src/ to dist/; then drop dev dependencies.
RUN npm ci --no-audit --no-fund && npm prune --omit=dev --no-audit --no-fund

FROM node:24-bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini curl ca-certificates tar gawk \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system compute-bridge \
 && useradd --system --gid compute-bridge --home-dir /var/lib/compute-bridge --shell /usr/sbin/nologin compute-bridge \
 && mkdir -p /var/lib/compute-bridge /etc/compute-bridge \
 && chown compute-bridge:compute-bridge /var/lib/compute-bridge \
 && chmod 0700 /var/lib/compute-bridge
WORKDIR /opt/compute-bridge
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY --from=build /src/bin ./bin
COPY package.json ./
COPY config/example.toml ./config/example.toml
ENV NODE_ENV=production
USER compute-bridge
VOLUME ["/var/lib/compute-bridge"]
ENV COMPUTE_BRIDGE_CONFIG=/etc/compute-bridge/bridge.toml
# 8787: the listener (listener.bind = "0.0.0.0:8787"); 9464: metrics and probes (listener.metrics_bind
# = "0.0.0.0:9464": plain HTTP, no token; publish it only to your Prometheus).
EXPOSE 8787 9464
# Asks /healthz on metrics_bind when set (whatever TLS the listener has), else on the listener.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["node", "/opt/compute-bridge/bin/compute-bridge.js", "healthcheck"]
STOPSIGNAL SIGTERM
# tini reaps the local backend's detached supervisors and forwards SIGTERM.
ENTRYPOINT ["/usr/bin/tini", "--", "node", "/opt/compute-bridge/bin/compute-bridge.js"]
CMD ["run"]
