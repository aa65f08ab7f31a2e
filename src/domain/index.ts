export * from "./almanac.js";
export * from "./grant.js";
export * from "./capabilities.js";
export * from "./instance.js";
export * from "./compute-log.js";
export * from "./card.js";
export * from "./decline.js";
export * from "./grant-record.js";
