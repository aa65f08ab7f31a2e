// Writes docs/openapi.json from the listener's route schemas (npm run openapi).
import { writeFileSync } from "node:fs";
import { defaultOpenApiDocument } from "../src/listener/contract.js";

writeFileSync(new URL("../docs/openapi.json", import.meta.url), await defaultOpenApiDocument());
process.stdout.write("wrote docs/openapi.json\n");
