#!/usr/bin/env node
/**
 * nestbroker: the daemons.
 *
 *   nestbroker guest --config /etc/nestbroker/guest.yaml   the guest agent (in a KVM guest)
 *   nestbroker host  --config /etc/nestbroker/host.yaml    the host broker (on the KVM host)
 *   nestbroker guest|host --check [--config FILE]        validate the config and exit
 *                                    (0 valid, 2 invalid: agent/cli/check.ts)
 *   nestbroker wait-ready guest|host --config FILE [--pid PID] [--timeout 90s]
 *                                    until that daemon is ready (the units' ExecStartPost=)
 */
import { runGuest } from '../guest/main';
import { GUEST_DEFAULTS, loadGuestConfig } from '../guest/config';
import { isNestError } from '../common/errors';
import { parseDuration } from '../common/units';
import { waitReady } from './wait-ready';
import { runCheck } from './check';
import { createLogger, LOG_FORMATS } from '../common/log';
import { quickDaemonArgs } from '../common/daemon-args';

/** The operator socket named by a daemon's config (the same file its unit starts it with). */
async function socketOf(daemon: 'guest' | 'host', config: string | undefined): Promise<string> {
  if (daemon === 'guest')
    return (await loadGuestConfig(config ?? GUEST_DEFAULTS.configFile)).socket;
  // Loaded only when asked for, as the host broker itself (a guest-only build has no host/).
  const { loadHostConfig, DEFAULT_HOST_CONFIG_PATH } = await import('../host/config');
  return (await loadHostConfig(config ?? DEFAULT_HOST_CONFIG_PATH)).socket;
}

async function runWaitReady(a: {
  daemon: string;
  config?: string;
  pid?: number;
  timeout: string;
}): Promise<number> {
  const t = parseDuration(a.timeout);
  const problems: string[] = [];
  if (!t.ok) problems.push(`--timeout ${t.message}`);
  if (a.pid !== undefined && !(Number.isSafeInteger(a.pid) && a.pid > 0))
    problems.push(`--pid: ${String(a.pid)} is not a process id`);
  if (problems.length > 0 || !t.ok) {
    for (const p of problems) process.stderr.write(`nestbroker wait-ready: ${p}\n`);
    return 2;
  }
  try {
    const socket = await socketOf(a.daemon as 'guest' | 'host', a.config);
    await waitReady({ socket, timeoutMs: t.value, pid: a.pid });
    return 0;
  } catch (err) {
    process.stderr.write(
      `nestbroker wait-ready ${a.daemon}: ${err instanceof Error ? err.message : String(err)}\n`,
    );
    return isNestError(err, 'CONFIG_INVALID') || isNestError(err, 'CONFIG_UNREADABLE') ? 2 : 1;
  }
}

/** The host broker's entry (agent/host/main.ts, helper-5), loaded only when asked for. */
async function runHostEntry(argv: string[]): Promise<number> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mod = require('../host/main') as { runHost(argv: string[]): Promise<number | void> };
  // --log-format was read here (into the environment createLogger reads); the host's own
  // strict parser does not know it.
  const own = argv.filter(
    (x, i) => !x.startsWith('--log-format') && !(argv[i - 1] === '--log-format'),
  );
  return (await mod.runHost(own)) ?? 0;
}

const CHECK_HELP =
  'validate the config, print every problem (exit 2) or a summary (exit 0); start nothing';

export async function main(argv: string[]): Promise<number> {
  // How units and scripts start a daemon, read without loading yargs (agent/common/daemon-args.ts).
  const quick = quickDaemonArgs(argv, LOG_FORMATS);
  if (quick) {
    if (quick.logFormat) process.env.NESTBROKER_LOG_FORMAT = quick.logFormat;
    if (quick.check) return runCheck(quick.daemon, quick.config);
    if (quick.daemon === 'guest') return runGuest({ config: quick.config });
    return runHostEntry(argv);
  }
  const { default: yargs } = await import('yargs');
  let code = 0;
  await yargs(argv)
    .scriptName('nestbroker')
    .option('log-format', {
      choices: LOG_FORMATS,
      describe: 'auto: journal under journald, pretty on a terminal, else json',
    })
    .middleware((a) => {
      if (a.logFormat) process.env.NESTBROKER_LOG_FORMAT = a.logFormat;
    })
    .command(
      'guest',
      "run the guest agent: client of the host broker, broker of this guest's projects",
      (y) =>
        y
          .option('config', {
            alias: 'c',
            type: 'string',
            describe: 'config file (default /etc/nestbroker/guest.yaml)',
          })
          .option('check', { type: 'boolean', describe: CHECK_HELP }),
      async (a) => {
        code = a.check ? await runCheck('guest', a.config) : await runGuest({ config: a.config });
      },
    )
    .command(
      'host',
      'run the host broker',
      (y) =>
        y
          .option('config', {
            alias: 'c',
            type: 'string',
            describe: 'config file (default /etc/nestbroker/host.yaml)',
          })
          .option('check', { type: 'boolean', describe: CHECK_HELP }),
      async (a) => {
        code = a.check ? await runCheck('host', a.config) : await runHostEntry(argv);
      },
    )
    .command(
      'wait-ready <daemon>',
      "wait until that daemon answers on its operator socket (the units' ExecStartPost=)",
      (y) =>
        y
          .positional('daemon', { choices: ['guest', 'host'] as const, demandOption: true })
          .option('config', { type: 'string', describe: "the daemon's config file" })
          .option('pid', {
            type: 'number',
            describe: "the daemon's pid ($MAINPID): give up at once when it exits",
          })
          .option('timeout', { type: 'string', default: '90s', describe: 'give up after' }),
      async (a) => {
        code = await runWaitReady(a);
      },
    )
    .demandCommand(1, 'name a daemon: guest or host')
    .strict()
    .help()
    .parseAsync();
  return code;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      // One line with the code on stderr, never a stack trace (a start-up failure is for
      // an operator to read; docs/errors.md says what each code means). The whole error,
      // stack and all, goes to the log (the journal under systemd) for a bug report.
      createLogger('nestbroker').fatal({ err }, 'nestbroker failed');
      const code = (err as { code?: unknown }).code;
      const message = err instanceof Error ? err.message : String(err);
      process.stderr.write(
        `nestbroker: (${typeof code === 'string' ? code : 'INTERNAL'}) ${message.split('\n').join(' ')}\n`,
      );
      process.exit(1);
    },
  );
}
