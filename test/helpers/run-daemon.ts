// Runs the real CLI `run` command in a child process (tests that kill -9 the daemon).
import { main } from "../../src/cli.js";

const code = await main(["run", "--config", process.argv[2]!]);
process.exit(code);
