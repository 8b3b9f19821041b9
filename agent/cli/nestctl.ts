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
import { NestError } from '../common/errors';
import { EXIT, jsonError } from './format';
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

/**
 * `--memory -5G` as `--memory=-5G`: yargs reads a dash-led word as short flags (`-5`, `-G`)
 * unless it is a plain number, so a negative size became "Unknown arguments: 5, G". No
 * nestctl flag is a digit, so a `-<digit>` word after a `--flag` is that flag's value,
 * which the command then refuses by name.
 */
export function joinNegativeValues(argv: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const x = argv[i];
    const next = argv[i + 1];
    if (/^--[a-z][a-z-]*$/.test(x) && next !== undefined && /^-\d/.test(next)) {
      out.push(`${x}=${next}`);
      i++;
    } else out.push(x);
  }
  return out;
}

/**
 * `nestctl … | head`: the reader goes away and the next write fails with EPIPE. That is
 * the reader's choice, not a failure: exit quietly (status 0) rather than with a stack.
 */
function quietOnEpipe(): void {
  for (const s of [process.stdout, process.stderr])
    s.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EPIPE') process.exit(EXIT.OK);
      throw err;
    });
}

export async function main(rawArgv: string[]): Promise<void> {
  const argv = joinNegativeValues(rawArgv);
  const guest = argv.includes('--guest');
  const asJson = argv.includes('--json');
  const completing = argv.includes('completion') || argv.includes('--get-yargs-completions');
  let y: Argv<GlobalArgs> = yargs(argv)
    // The completion script names the program it calls, so it is plain `nestctl` there
    // (it passes the words typed, `--guest` among them, back to nestctl).
    .scriptName(guest && !completing ? 'nestctl --guest' : 'nestctl')
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
      // With --json a script reads errors as it reads results: one JSON object on stdout.
      if (asJson)
        process.stdout.write(
          `${jsonError(new NestError('INPUT_INVALID', msg, { problems: [{ field: 'arguments', value: rawArgv, message: msg }] }))}\n`,
        );
      else process.stderr.write(`error: ${msg}\nrun with --help for usage\n`);
      process.exit(EXIT.USAGE);
    })
    // `nestctl completion >> ~/.bashrc` (or /etc/bash_completion.d/nestctl, which `make
    // install` writes): bash completion of commands and flags, through yargs.
    .completion('completion', 'print a bash completion script for nestctl')
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
  quietOnEpipe();
  const argv = hideBin(process.argv);
  main(argv).catch((err: unknown) => {
    if (argv.includes('--json')) process.stdout.write(`${jsonError(err)}\n`);
    else process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = EXIT.ERROR;
  });
}
