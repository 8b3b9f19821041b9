/**
 * `nestbroker guest --config FILE`: load and check the config (every problem listed, exit 2,
 * nothing created), start the agent, stop cleanly on SIGTERM/SIGINT. Projects keep running
 * when the agent stops (the unit's KillMode=process); the next start re-adopts them.
 */
import { createLogger } from '../common/log';
import { isNestError } from '../common/errors';
import { GUEST_DEFAULTS, loadGuestConfig } from './config';
import { GuestAgent } from './agent';

export const EXIT_CONFIG = 2;

export async function runGuest(opts: { config?: string }): Promise<number> {
  const file = opts.config ?? GUEST_DEFAULTS.configFile;
  let cfg;
  try {
    cfg = await loadGuestConfig(file);
  } catch (err) {
    if (isNestError(err)) {
      process.stderr.write(`nestbroker guest: config refused: ${err.message}\n`);
      if (!err.message.includes('\n'))
        for (const p of err.problems) process.stderr.write(`  ${p.field}: ${p.message}\n`);
      return EXIT_CONFIG;
    }
    throw err;
  }
  const log = createLogger('nestbroker-guest');
  let agent: GuestAgent;
  try {
    agent = await GuestAgent.start(cfg, { log });
  } catch (err) {
    log.fatal({ err }, 'guest agent could not start');
    // `(CODE) message`: the code (STATE_LOCKED, a cgroup errno code...) is what scripts branch on.
    const code = (err as { code?: unknown }).code;
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(
      `nestbroker guest: could not start: ${typeof code === 'string' ? `(${code}) ` : ''}${message}\n`,
    );
    return 1;
  }
  await new Promise<void>((resolve) => {
    const stop = (sig: string): void => {
      log.info({ signal: sig }, 'stopping (projects keep running)');
      void agent.stop().finally(resolve);
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
  return 0;
}
