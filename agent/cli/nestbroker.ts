#!/usr/bin/env node
/**
 * nestbroker: the daemons.
 *
 *   nestbroker guest --config /etc/nestbroker/guest.yaml   the guest agent (in a KVM guest)
 *   nestbroker host  --config /etc/nestbroker/host.yaml    the host broker (on the KVM host)
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { runGuest } from '../guest/main';

/** The host broker's entry (agent/host/main.ts, helper-5), loaded only when asked for. */
async function runHostEntry(argv: string[]): Promise<number> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mod = require('../host/main') as { runHost(argv: string[]): Promise<number | void> };
  return (await mod.runHost(argv)) ?? 0;
}

export async function main(argv: string[]): Promise<number> {
  let code = 0;
  await yargs(argv)
    .scriptName('nestbroker')
    .command(
      'guest',
      "run the guest agent: client of the host broker, broker of this guest's projects",
      (y) =>
        y.option('config', {
          type: 'string',
          describe: 'config file (default /etc/nestbroker/guest.yaml)',
        }),
      async (a) => {
        code = await runGuest({ config: a.config });
      },
    )
    .command(
      'host',
      'run the host broker',
      (y) =>
        y.option('config', {
          type: 'string',
          describe: 'config file (default /etc/nestbroker/host.yaml)',
        }),
      async () => {
        code = await runHostEntry(argv);
      },
    )
    .demandCommand(1, 'name a daemon: guest or host')
    .strict()
    .help()
    .parseAsync();
  return code;
}

if (require.main === module) {
  main(hideBin(process.argv)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`nestbroker: ${err instanceof Error ? err.stack : String(err)}\n`);
      process.exit(1);
    },
  );
}
