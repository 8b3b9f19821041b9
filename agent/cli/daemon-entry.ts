/**
 * The entry point of the bundled daemons (dist/bundle/nestbroker.js, the Makefile's
 * `bundle` target; docs/performance.md, "Footprint: what each step saved"): the same
 * command line as agent/cli/nestbroker.ts, which only runs itself when it is the program.
 */
import { runCli } from './nestbroker';

runCli();
