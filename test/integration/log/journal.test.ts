/**
 * The log forms of agent/common/log.ts from real processes (docs/install.md "Logs"): the
 * guest agent spawned the way systemd runs it, stdout a stream whose device:inode is in
 * JOURNAL_STREAM (systemd.exec(5)), prints each line with its sd-daemon(3) priority prefix;
 * the same variable inherited by a process whose stdout is elsewhere does not; a terminal
 * form on request. journald itself is checked when this machine runs it.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ensureBuilt, NESTBROKER, REPO } from '../guest/harness';

jest.setTimeout(60_000);

let dir: string;
let config: string;

beforeAll(async () => {
  ensureBuilt();
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-log-'));
  const blocker = path.join(dir, 'a-file');
  await fsp.writeFile(blocker, '');
  config = path.join(dir, 'guest.yaml');
  const project = (name: string, priority: number) => ({
    name,
    priority,
    memory: { min: '768MiB', max: '1GiB' },
    cpu: { min: 0.1, max: 1 },
    command: { argv: ['/bin/true'] },
  });
  // Minimums above the resources: a warning at start. A state directory under a regular
  // file: the start fails (ENOTDIR) before any cgroup is made, so the daemon exits alone.
  await fsp.writeFile(
    config,
    JSON.stringify({
      guest: 'vm-log',
      stateDir: path.join(blocker, 'state'),
      runDir: path.join(dir, 'run'),
      socket: path.join(dir, 'guest.sock'),
      projectSocket: path.join(dir, 'projects.sock'),
      cgroup: { root: 'nb-log-never-made' },
      resources: { cpus: 1, memory: '1GiB' },
      reserve: { memory: '0', cpus: 0 },
      upstream: { transport: 'none' },
      projects: [project('a', 1), project('b', 2)],
    }),
  );
});

afterAll(async () => {
  if (dir) await fsp.rm(dir, { recursive: true, force: true });
});

interface Run {
  code: number | null;
  stdout: string;
}

/**
 * Runs argv under sh. With `journal`, JOURNAL_STREAM is set to the device:inode of the
 * stdout the process really has (the pipe to this test), as systemd does for its stream.
 */
function run(argv: string[], opts: { journal?: boolean; env?: NodeJS.ProcessEnv } = {}) {
  const script = opts.journal
    ? 'export JOURNAL_STREAM="$(stat -L -c %d:%i /proc/$$/fd/1)"; exec "$@"'
    : 'exec "$@"';
  const env = { ...process.env, ...opts.env };
  delete env.NESTBROKER_LOG_FORMAT;
  if (!opts.journal && !opts.env?.JOURNAL_STREAM) delete env.JOURNAL_STREAM;
  const c = spawn('sh', ['-c', script, 'sh', ...argv], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  return new Promise<Run>((resolve) => c.on('close', (code) => resolve({ code, stdout })));
}

const guest = (...extra: string[]) => [
  process.execPath,
  NESTBROKER,
  ...extra,
  'guest',
  '--config',
  config,
];

/**
 * The output's lines, less the start-up warnings about this machine's hot-unplug
 * prerequisites (docs/guest-agent.md), which depend on its kernel and sysfs, not on the
 * log format.
 */
function lines(s: string): string[] {
  return s
    .split('\n')
    .filter(Boolean)
    .filter((l) => !l.includes('prerequisite missing'));
}

test('under a journald stream every line of the guest agent starts with its priority, the JSON after it', async () => {
  const r = await run(guest(), { journal: true });
  expect(r.code).toBe(1);
  const got = lines(r.stdout).map((l) => {
    const m = /^<(\d)>(\{.*\})$/.exec(l);
    expect(m).not.toBeNull();
    const o = JSON.parse(m![2]) as { level: number; msg: string };
    return { prio: Number(m![1]), level: o.level, msg: o.msg };
  });
  expect(got).toEqual([
    { prio: 4, level: 40, msg: expect.stringContaining('the minimums add up to 1.5GiB') },
    { prio: 2, level: 60, msg: 'guest agent could not start' },
  ]);
});

test('JOURNAL_STREAM naming another stream (inherited by a child whose stdout is a pipe) keeps JSON', async () => {
  const r = await run(guest(), { env: { JOURNAL_STREAM: '8:12345' } });
  expect(r.code).toBe(1);
  const ls = lines(r.stdout);
  expect(ls).toHaveLength(2);
  for (const l of ls) expect(l.startsWith('{')).toBe(true);
});

test('--log-format pretty: one readable line per event, the fields as key=value', async () => {
  const r = await run(guest('--log-format', 'pretty'), { journal: true });
  expect(r.code).toBe(1);
  const ls = lines(r.stdout);
  expect(ls).toHaveLength(2);
  expect(ls[0]).toMatch(
    /^\d\d:\d\d:\d\d\.\d{3} WARN {2}nestbroker-guest: the minimums add up to 1\.5GiB.* guest=vm-log field=projects\[\*\]\.memory\.min value=1610612736$/,
  );
  expect(ls[1]).toMatch(
    /^\d\d:\d\d:\d\d\.\d{3} FATAL nestbroker-guest: guest agent could not start err="Error ENOTDIR: ENOTDIR: not a directory/,
  );
});

test('every pino level maps to its syslog priority', async () => {
  const logger = path.join(REPO, 'dist/agent/common/log.js');
  const code = `const l = require(${JSON.stringify(logger)}).createLogger('t', 'trace');
    l.trace('t'); l.debug('d'); l.info('i'); l.warn('w'); l.error('e'); l.fatal('f');`;
  const r = await run([process.execPath, '-e', code], { journal: true });
  expect(r.code).toBe(0);
  expect(lines(r.stdout).map((l) => l.slice(0, 3) + JSON.parse(l.slice(3)).msg)).toEqual([
    '<7>t',
    '<7>d',
    '<6>i',
    '<4>w',
    '<3>e',
    '<2>f',
  ]);
});

const journald = existsSync('/run/systemd/journal/stdout') && existsSync('/usr/bin/journalctl');
(journald ? test : test.skip)(
  'journald (when it runs here): an error of the agent is found by journalctl -p err',
  async () => {
    const tag = `nestbroker-logtest-${process.pid}`;
    const cat = spawnSync(
      'systemd-cat',
      ['-t', tag, '--level-prefix=true', ...guest('--log-format', 'journal')],
      {
        encoding: 'utf8',
      },
    );
    expect(cat.status).toBe(1);
    spawnSync('journalctl', ['--sync']);
    const q = (p: string) =>
      spawnSync('journalctl', ['-t', tag, '-p', p, '-o', 'cat', '--no-pager'], {
        encoding: 'utf8',
      }).stdout;
    expect(lines(q('err'))).toEqual([expect.stringContaining('guest agent could not start')]);
    expect(lines(q('warning'))).toHaveLength(2);
  },
);
