/**
 * `nestbroker guest --config FILE`: load and check the config (every problem listed, exit 2,
 * nothing created), start the agent, stop cleanly on SIGTERM/SIGINT, reload the config on
 * SIGHUP (agent/guest/reload.ts). Projects keep running when the agent stops (the unit's
 * KillMode=process); the next start re-adopts them.
 */
import { catchStopSignals } from '../common/stop-signals';
import { createLogger, type Logger } from '../common/log';
import { isNestError, type Problem } from '../common/errors';
import { GUEST_DEFAULTS, loadGuestConfig } from './config';
import { GuestAgent } from './agent';
import { applyGuestReload, type ReloadReport } from './reload';

export const EXIT_CONFIG = 2;

/** What a reload answers (`nestctl --guest reload`, and the log lines of a SIGHUP). */
export type ReloadResult =
  | { ok: true; report: ReloadReport }
  | { ok: false; source: string; code: string; problems: Problem[] };

/**
 * Reloads `file` into `agent`, one reload at a time. An invalid or unreadable file is
 * refused: every problem logged, the config in force stays.
 */
export function guestReloader(
  agent: GuestAgent,
  file: string,
  log: Logger,
  setLevel: (level: string) => void,
): (trigger: string) => Promise<ReloadResult> {
  let chain: Promise<unknown> = Promise.resolve();
  return (trigger) => {
    const run = async (): Promise<ReloadResult> => {
      log.info({ trigger, config: file }, 'reload: reading the config');
      let next;
      try {
        next = await loadGuestConfig(file);
      } catch (err) {
        if (!isNestError(err)) throw err;
        const problems = err.problems.length
          ? err.problems
          : [{ field: '(file)', value: file, message: err.message }];
        for (const p of problems)
          log.error({ field: p.field, value: p.value }, `reload refused: ${p.field}: ${p.message}`);
        log.error(
          { code: err.code, problems: problems.length, config: file },
          'reload refused: the config has problems; the config in force stays',
        );
        return { ok: false, source: file, code: err.code, problems };
      }
      return { ok: true, report: await applyGuestReload(agent, next, log, setLevel) };
    };
    const p = chain.then(run);
    chain = p.catch(() => undefined);
    return p;
  };
}

export async function runGuest(opts: { config?: string }): Promise<number> {
  const file = opts.config ?? GUEST_DEFAULTS.configFile;
  // A SIGHUP before the agent is up must not end it (the default action): it is applied
  // once the agent is ready.
  let hupPending = false;
  const early = (): void => {
    hupPending = true;
  };
  process.on('SIGHUP', early);
  let cfg;
  try {
    cfg = await loadGuestConfig(file);
  } catch (err) {
    process.off('SIGHUP', early);
    if (isNestError(err)) {
      process.stderr.write(`nestbroker guest: config refused: ${err.message}\n`);
      if (!err.message.includes('\n'))
        for (const p of err.problems) process.stderr.write(`  ${p.field}: ${p.message}\n`);
      return EXIT_CONFIG;
    }
    throw err;
  }
  const log = createLogger('nestbroker-guest', cfg.logLevel);
  // Children inherit the root's level unless they set their own (pino): one write is enough.
  const setLevel = (level: string): void => {
    log.level = level;
  };
  const stopSignals = catchStopSignals();
  let agent: GuestAgent;
  try {
    agent = await GuestAgent.start(cfg, { log });
  } catch (err) {
    stopSignals.dispose();
    process.off('SIGHUP', early);
    log.fatal({ err }, 'guest agent could not start');
    // `(CODE) message`: the code (STATE_LOCKED, a cgroup errno code...) is what scripts branch on.
    const code = (err as { code?: unknown }).code;
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(
      `nestbroker guest: could not start: ${typeof code === 'string' ? `(${code}) ` : ''}${message}\n`,
    );
    return 1;
  }
  const reload = guestReloader(agent, file, log.child({ guest: cfg.guest }), setLevel);
  agent.reload = reload;
  const onHup = (): void => {
    reload('SIGHUP').catch((err: unknown) => log.error({ err }, 'reload failed'));
  };
  process.on('SIGHUP', onHup);
  process.off('SIGHUP', early);
  if (hupPending) onHup();
  const sig = await stopSignals.next();
  log.info({ signal: sig }, 'stopping (projects keep running)');
  await new Promise<void>((resolve) => void agent.stop().finally(resolve));
  process.off('SIGHUP', onHup);
  return 0;
}
