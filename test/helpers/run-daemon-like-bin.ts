// Runs the CLI `run` command the way bin/compute-bridge.js does: it sets process.exitCode and lets
// the event loop drain, so anything left pending after shutdown (a socket, a timer, a blocked
// file open) keeps the process alive, as it would in production.
import { main } from "../../src/cli.js";

process.exitCode = await main(["run", "--config", process.argv[2]!]);
