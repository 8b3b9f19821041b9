#!/usr/bin/env node
/**
 * nestctl: the operator's commands.
 *
 *   nestctl --guest projects|plan|reclaim|restore|notices|cancel|status [...]   (in a guest)
 *   nestctl <host command> [...]                                              (on the host)
 *
 * `--guest` talks to the guest agent's socket (/run/nestbroker/guest.sock); without it the
 * host broker's commands apply (agent/cli/host-commands.ts, registered below). `--socket`
 * overrides the socket, `--json` prints JSON for scripts. Exit codes: see EXIT in format.ts.
 */
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { EXIT } from './format';
import { DEFAULT_GUEST_SOCKET, registerGuestCommands, type GlobalArgs } from './guest-commands';

/**
 * Registration point for the host broker's commands: agent/cli/host-commands.ts exports
 * `registerHostCommands(yargs)`. Loaded only when present, so a guest-only build works.
 */
export type Registrar = (y: Argv<GlobalArgs>) => Argv<GlobalArgs>;
function hostCommands(): Registrar | null {
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const mod = require('./host-commands') as { registerHostCommands?: Registrar };
    return mod.registerHostCommands ?? null;
  } catch (err) {
    if ((err as { code?: string }).code === 'MODULE_NOT_FOUND') return null;
    throw err;
  }
}

const EXIT_CODES_HELP = `Exit codes:
  ${EXIT.OK}  done; a notice's outcome is complete
  ${EXIT.ERROR}  nestctl failed (no daemon at the socket, unexpected error)
  ${EXIT.USAGE}  an argument was refused (each problem is listed)
  ${EXIT.PARTIAL}  the notice was carried out in part (outcome partial)
  ${EXIT.FAILED}  the notice failed (outcome failed)
  ${EXIT.REJECTED}  the notice was refused (does not fit, stale, journal write failed)
  ${EXIT.TIMEOUT}  the daemon did not answer in time`;

export async function main(argv: string[]): Promise<void> {
  const guest = argv.includes('--guest');
  let y: Argv<GlobalArgs> = yargs(argv)
    .scriptName(guest ? 'nestctl --guest' : 'nestctl')
    .usage(
      guest
        ? "$0 --guest <command> [options]\n\nOperator commands of this guest's nestbroker agent."
        : '$0 <command> [options]\n\nOperator commands of nestbroker (the host broker; --guest for the guest agent).',
    )
    .option('guest', {
      type: 'boolean',
      describe: `talk to this guest's agent (socket ${DEFAULT_GUEST_SOCKET})`,
      global: true,
    })
    .option('socket', { type: 'string', describe: 'the daemon socket to use', global: true })
    .option('json', { type: 'boolean', describe: 'print JSON for scripts', global: true })
    .epilogue(EXIT_CODES_HELP)
    .strict()
    .demandCommand(1, 'name a command (see --help)')
    .recommendCommands()
    .fail((msg, err) => {
      if (err) throw err;
      process.stderr.write(`error: ${msg}\nrun with --help for usage\n`);
      process.exit(EXIT.USAGE);
    })
    .help()
    .wrap(Math.min(110, process.stdout.columns ?? 100));
  if (guest) y = registerGuestCommands(y);
  else {
    const host = hostCommands();
    if (host) y = host(y);
    else
      y = y.command('*', false, {}, () => {
        process.stderr.write('error: host commands are not in this build; use --guest\n');
        process.exitCode = EXIT.USAGE;
      });
  }
  await y.parseAsync();
}

if (require.main === module) {
  main(hideBin(process.argv)).catch((err: unknown) => {
    process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = EXIT.ERROR;
  });
}
