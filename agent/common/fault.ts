/**
 * TEST-ONLY fault injection (docs/reliability.md, test/faults/): with
 * NESTBROKER_FAULT=<step> in its environment a daemon kills itself with SIGKILL the first
 * time it reaches that step, so a test can crash it at an exact point of a notice instead
 * of racing a timer. Unset (always, in production) this is one string comparison. The
 * steps:
 *
 *   guest: after-ack, mid-shrink, mid-stop, before-outcome
 *   host:  after-journal, after-send, before-actuation
 *
 * docs/reliability.md lists where each one sits; test/faults/ uses them.
 */
import { writeSync } from 'node:fs';

export type FaultStep =
  | 'after-ack'
  | 'mid-shrink'
  | 'mid-stop'
  | 'before-outcome'
  | 'after-journal'
  | 'after-send'
  | 'before-actuation';

export function faultPoint(step: FaultStep): void {
  if (process.env.NESTBROKER_FAULT !== step) return;
  // Synchronous: the line is on stderr before the kill, for the test's log.
  writeSync(2, `NESTBROKER_FAULT=${step}: killing pid ${process.pid} with SIGKILL\n`);
  process.kill(process.pid, 'SIGKILL');
}
