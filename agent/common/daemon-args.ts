/**
 * The daemons' few options read without yargs: `nestbroker guest|host [--config FILE | -c
 * FILE] [--check] [--log-format F]`, which is every way a unit or the bench starts them. yargs alone is ~8 MiB of RSS in a process that never parses
 * another argument (docs/performance.md, "Footprint: what each step saved"), so it is loaded
 * only when argv holds anything else — `--help`, an unknown option, a missing value — and
 * it then prints the help and the errors as it always did.
 */
export interface DaemonArgs {
  daemon: 'guest' | 'host';
  config?: string;
  logFormat?: string;
  check: boolean;
}

/** The parsed options, or null: let yargs read this argv (and explain what is wrong). */
export function quickDaemonArgs(
  argv: readonly string[],
  logFormats: readonly string[],
): DaemonArgs | null {
  const daemon = argv[0];
  if (daemon !== 'guest' && daemon !== 'host') return null;
  const out: DaemonArgs = { daemon, check: false };
  const seen = new Set<string>();
  for (let i = 1; i < argv.length; i++) {
    const arg = argv[i];
    const eq = arg.indexOf('=');
    let name = eq > 0 ? arg.slice(0, eq) : arg;
    if (name === '-c') name = '--config';
    if (seen.has(name)) return null; // yargs makes an array of a repeated option
    seen.add(name);
    if (name === '--check' && eq < 0) {
      out.check = true;
      continue;
    }
    if (name !== '--config' && name !== '--log-format') return null;
    const value = eq > 0 ? arg.slice(eq + 1) : argv[++i];
    if (value === undefined || value === '' || (eq < 0 && value.startsWith('-'))) return null;
    if (name === '--config') out.config = value;
    else if (logFormats.includes(value)) out.logFormat = value;
    else return null;
  }
  return out;
}
