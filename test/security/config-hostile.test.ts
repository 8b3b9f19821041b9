/**
 * Hostile guest configs (docs/reliability.md, "Bad input"): names that try to climb out of
 * the cgroup subtree or collide with kernel files, sizes and durations that JSON and YAML
 * can carry but a limit file cannot, unknown and prototype keys, files that are missing,
 * unreadable to the user reading them, directories, FIFOs, too large, nested 20 000 deep or
 * alias bombs. Every one is refused at start with every problem listed, and the real
 * `nestbroker guest` process exits 2 having created nothing: no state or run directory, no
 * socket, no cgroup in any hierarchy.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { isNestError, type NestError } from '../../agent/common/errors';
import { loadGuestConfig, validateGuestConfig } from '../../agent/guest/config';
import { ensureBuilt, NESTBROKER, REPO } from '../integration/guest/harness';

const NOBODY = 65534;
/** Never created by this test: its absence afterwards is the point. */
const CGROUP_ROOT = `nestbroker-test-${process.pid}-hostile`;
const HIERARCHIES = ['unified', 'memory', 'cpu', 'cpuacct', 'cpuset', 'pids'];

let dir: string;

beforeAll(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-hostile-'));
  // The unprivileged reader must be able to reach the files it is refused.
  await fsp.chmod(dir, 0o755);
});

afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

function refusal(fn: () => unknown): NestError {
  try {
    fn();
  } catch (err) {
    if (isNestError(err)) return err;
    throw new Error(`threw something that is not a NestError: ${String(err)}`);
  }
  throw new Error('the config was accepted');
}

async function refusalAsync(p: Promise<unknown>): Promise<NestError> {
  try {
    await p;
  } catch (err) {
    if (isNestError(err)) return err;
    throw new Error(`threw something that is not a NestError: ${String(err)}`);
  }
  throw new Error('the config was accepted');
}

const project = (name: unknown, extra: Record<string, unknown> = {}) => ({
  name,
  priority: 1,
  command: { argv: ['/bin/true'] },
  ...extra,
});

/** Names a project must never have: each would escape, collide or deceive. */
const HOSTILE_NAMES: [string, unknown][] = [
  ['dot-dot', '..'],
  ['dot', '.'],
  ['climb', '../../etc'],
  ['slash', '/'],
  ['absolute', '/sys/fs/cgroup'],
  ['inner slash', 'web/../../x'],
  ['NUL', 'web\0'],
  ['newline', 'web\n'],
  ['empty', ''],
  ['leading space', ' web'],
  ['kernel file', 'cgroup.procs'],
  ['kernel file', 'memory.max'],
  ['kernel file', 'tasks'],
  ['kernel file', 'release_agent'],
  ['64 chars', 'a'.repeat(64)],
  ['4096 chars', 'b'.repeat(4096)],
  ['Cyrillic е', 'w\u0435b'],
  ['full-width', '\uff57\uff45\uff42'],
  ['zero-width space', 'web\u200b'],
  ['right-to-left override', 'web\u202egpj'],
  ['upper case', 'Web'],
  ['leading dash', '-web'],
  ['number', 42],
  ['null', null],
  ['object', { toString: 'web' }],
];

test('every hostile project name is refused, each named by its index, in one CONFIG_INVALID', () => {
  const raw = {
    guest: 'vm1',
    upstream: { transport: 'none' },
    projects: HOSTILE_NAMES.map(([, n]) => project(n)),
  };
  const err = refusal(() => validateGuestConfig(raw, 'hostile-names'));
  expect(err.code).toBe('CONFIG_INVALID');
  HOSTILE_NAMES.forEach(([why, name], i) => {
    const p = err.problems.find((q) => q.field === `projects[${i}].name`);
    if (!p) throw new Error(`name ${why} ${JSON.stringify(name)} (projects[${i}]) was not refused`);
    expect(p.message.length).toBeGreaterThan(10);
  });
  // The look-alikes say which character is wrong, so a person can see the trick.
  expect(err.problems.find((q) => q.field === 'projects[16].name')?.message).toContain('U+0435');
  expect(err.problems.find((q) => q.field === 'projects[19].name')?.message).toContain('U+202E');
});

test('hostile guest names, cgroup roots and paths are refused too', () => {
  const raw = {
    guest: '../../etc',
    stateDir: 'relative/state',
    runDir: '/run/../etc',
    socket: `/tmp/${'s'.repeat(200)}.sock`,
    projectSocket: '/run/x\0y',
    cgroup: { root: '../../..' },
    upstream: { transport: 'unix', path: 'x' },
    projects: [project('web', { adopt: { cgroup: '/sys/fs/cgroup' }, command: undefined })],
  };
  const err = refusal(() => validateGuestConfig(raw, 'hostile-paths'));
  for (const f of [
    'guest',
    'stateDir',
    'runDir',
    'socket',
    'projectSocket',
    'cgroup.root',
    'upstream.path',
    'projects[0].adopt.cgroup',
  ])
    expect(err.problems.map((p) => p.field)).toContain(f);
});

/** [field, value]: sizes, CPUs and durations that no limit file or timer can hold. */
const HOSTILE_VALUES: [string, unknown][] = [
  ['memory.min', -1],
  ['memory.min', '-1'],
  ['memory.min', Infinity],
  ['memory.min', NaN],
  ['memory.min', 2 ** 60],
  ['memory.min', '1e309'],
  ['memory.min', '12XB'],
  ['memory.min', '9999999TiB'],
  ['memory.min', '0x10'],
  ['memory.min', '1.5.5GiB'],
  ['memory.min', '\u0661\u0662\u0663'], // Arabic-Indic digits
  ['memory.max', 0],
  ['memory.max', ''],
  ['memory.max', 'unlimited'],
  ['cpu.min', -1],
  ['cpu.min', '1/2'],
  ['cpu.max', 0.001],
  ['cpu.max', -0.5],
  ['cpu.weight', 0],
  ['cpu.weight', 10_001],
  ['cpu.weight', 1.5],
  ['stop.gracePeriod', '-1s'],
  ['stop.gracePeriod', '1y'],
  ['stop.gracePeriod', '200h'],
  ['stop.gracePeriod', Infinity],
  ['stop.gracePeriod', 'soon'],
  ['stop.signal', 'SIGKILLL'],
  ['stop.signal', 'SIGSTOP'],
  ['stop.signal', ' SIGTERM'],
  ['pidsMax', 0],
  ['pidsMax', 2 ** 40],
  ['priority', Number('1e309')], // Infinity, as JSON.parse reads 1e309
  ['priority', '10'],
  ['priority', 2_000_000],
];

function setAt(o: Record<string, unknown>, dotted: string, v: unknown): void {
  const keys = dotted.split('.');
  let cur = o;
  for (const k of keys.slice(0, -1)) cur = (cur[k] ??= {}) as Record<string, unknown>;
  cur[keys[keys.length - 1]] = v;
}

test('hostile sizes, CPUs, durations and signals are each refused with the field and the value', () => {
  const projects = HOSTILE_VALUES.map(([f, v], i) => {
    const p: Record<string, unknown> = project(`p${i}`);
    setAt(p, f, v);
    return p;
  });
  const raw = {
    guest: 'vm1',
    usageInterval: '1ms',
    upstream: { transport: 'none' },
    resources: { cpus: -2, memory: '1e309' },
    projects,
  };
  const err = refusal(() => validateGuestConfig(raw, 'hostile-values'));
  const fields = err.problems.map((p) => p.field);
  HOSTILE_VALUES.forEach(([f, v], i) => {
    if (!fields.includes(`projects[${i}].${f}`))
      throw new Error(`projects[${i}].${f} = ${String(v)} was not refused`);
  });
  for (const f of ['usageInterval', 'resources.cpus', 'resources.memory'])
    expect(fields).toContain(f);
  // Every problem at once: at least one per hostile value.
  expect(err.problems.length).toBeGreaterThanOrEqual(HOSTILE_VALUES.length + 3);
  expect(err.message).toContain(`${err.problems.length} problems`);
});

test('unknown keys at every depth and prototype keys are refused, and nothing is polluted', () => {
  // JSON.parse makes `__proto__` an own key, as a YAML or JSON config file would.
  const raw = JSON.parse(
    JSON.stringify({
      guest: 'vm1',
      colour: 'blue',
      upstream: { transport: 'none', extra: 1 },
      cgroup: { root: 'self', drivr: 'v2' },
      projects: [project('web', { memory: { min: 0, mx: '1GiB' }, stop: { grace: '1s' } })],
    }).replace(
      '{',
      '{"__proto__":{"polluted":true},"constructor":{"prototype":{"polluted":true}},',
    ),
  );
  const err = refusal(() => validateGuestConfig(raw, 'hostile-keys'));
  const fields = err.problems.map((p) => p.field);
  for (const f of [
    '__proto__',
    'constructor',
    'colour',
    'upstream.extra',
    'cgroup.drivr',
    'projects[0].memory.mx',
    'projects[0].stop.grace',
  ])
    expect(fields).toContain(f);
  // "did you mean" for typos.
  expect(err.problems.find((p) => p.field === 'cgroup.drivr')?.message).toContain('"driver"');
  expect(({} as Record<string, unknown>).polluted).toBeUndefined();
});

describe('files', () => {
  const write = async (name: string, text: string | Buffer, mode = 0o644): Promise<string> => {
    const f = path.join(dir, name);
    await fsp.writeFile(f, text);
    await fsp.chmod(f, mode);
    return f;
  };

  test('missing, a directory, a FIFO, /dev/zero and a file over 1 MiB are CONFIG_UNREADABLE', async () => {
    const fifo = path.join(dir, 'fifo.yaml');
    spawnSync('mkfifo', [fifo]);
    expect(existsSync(fifo)).toBe(true);
    const big = await write('big.yaml', Buffer.alloc(1024 * 1024 + 1, 0x23));
    for (const [f, why] of [
      [path.join(dir, 'missing.yaml'), /ENOENT/],
      [dir, /not a regular file/],
      [fifo, /not a regular file/], // never opened: a read would block for ever
      ['/dev/zero', /not a regular file/],
      [big, /larger than 1/],
    ] as const) {
      const err = await refusalAsync(loadGuestConfig(f));
      expect(err.code).toBe('CONFIG_UNREADABLE');
      expect(err.message).toMatch(why);
      expect(err.problems[0].field).toBe('(file)');
    }
  });

  test('JSON nested 20 000 deep, YAML nested 5 000 deep, an alias bomb and binary junk are CONFIG_INVALID, not a crash', async () => {
    const files = [
      await write(
        'deep.json',
        `{"guest": ${'['.repeat(20_000)}${']'.repeat(20_000)}, "projects": []}`,
      ),
      await write('deep.yaml', `guest: ${'['.repeat(5000)}${']'.repeat(5000)}\nprojects: []\n`),
      await write(
        'bomb.yaml',
        [
          'a: &a [x, x, x, x, x, x, x, x, x]',
          'b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]',
          'c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]',
          'd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]',
          'e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]',
          'guest: vm1',
          'projects: []',
        ].join('\n'),
      ),
      await write('junk.yaml', Buffer.from([0xff, 0xfe, 0x00, 0x3a, 0x0a, 0x7b, 0x5b, 0xc3])),
    ];
    for (const f of files) {
      const err = await refusalAsync(loadGuestConfig(f));
      expect(err.code).toBe('CONFIG_INVALID');
      expect(err.problems.length).toBeGreaterThan(0);
    }
  });

  test('a file the reading user may not read (chmod 000, read as nobody) is CONFIG_UNREADABLE naming EACCES', async () => {
    ensureBuilt();
    const f = await write('secret.yaml', 'guest: vm1\nprojects: []\n', 0o000);
    const script = `
      require(${JSON.stringify(path.join(REPO, 'dist/agent/guest/config.js'))})
        .loadGuestConfig(${JSON.stringify(f)})
        .then(() => { console.log('ACCEPTED'); process.exit(0); },
              (e) => { console.log(JSON.stringify({ code: e.code, message: e.message, uid: process.getuid() })); process.exit(3); });`;
    const r = spawnSync(process.execPath, ['-e', script], {
      uid: NOBODY,
      gid: NOBODY,
      encoding: 'utf8',
      cwd: dir,
    });
    expect(r.status).toBe(3);
    const out = JSON.parse(r.stdout.trim());
    expect(out).toMatchObject({ code: 'CONFIG_UNREADABLE', uid: NOBODY });
    expect(out.message).toContain('EACCES');
  });
});

describe('the real `nestbroker guest` process', () => {
  const env = () => ({
    stateDir: path.join(dir, 'cli', 'state'),
    runDir: path.join(dir, 'cli', 'run'),
    socket: path.join(dir, 'cli', 'guest.sock'),
    channel: path.join(dir, 'cli', 'channel.sock'),
  });

  function run(config: string): Promise<{ code: number | null; stderr: string; stdout: string }> {
    return new Promise((resolve) => {
      const c = spawn(process.execPath, [NESTBROKER, 'guest', '--config', config], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const t = setTimeout(() => c.kill('SIGKILL'), 20_000);
      c.on('exit', (code) => {
        clearTimeout(t);
        resolve({ code, stdout, stderr });
      });
    });
  }

  function nothingCreated(): void {
    const e = env();
    expect(existsSync(e.stateDir)).toBe(false);
    expect(existsSync(e.runDir)).toBe(false);
    expect(existsSync(e.socket)).toBe(false);
    expect(existsSync(e.channel)).toBe(false);
    for (const h of HIERARCHIES)
      expect(existsSync(path.join('/sys/fs/cgroup', h, CGROUP_ROOT))).toBe(false);
  }

  beforeAll(() => ensureBuilt());

  test('a hostile config: exit 2, stderr lists every problem, nothing created on disk or in cgroupfs', async () => {
    const e = env();
    const cfg = {
      guest: 'vm1',
      stateDir: e.stateDir,
      runDir: e.runDir,
      socket: e.socket,
      cgroup: { root: `${CGROUP_ROOT}/guest` },
      upstream: { transport: 'unix', path: e.channel },
      colour: 'blue',
      projects: [
        project('../../etc'),
        project('cgroup.procs'),
        project('w\u0435b'),
        project('a'.repeat(64)),
        project('ok', { memory: { min: '1e309', max: -1 }, stop: { gracePeriod: '1y' } }),
      ],
    };
    const f = path.join(dir, 'cli-hostile.json');
    await fsp.writeFile(f, JSON.stringify(cfg));
    const r = await run(f);
    expect(r.code).toBe(2);
    for (const field of [
      'colour',
      'projects[0].name',
      'projects[1].name',
      'projects[2].name',
      'projects[3].name',
      'projects[4].memory.min',
      'projects[4].memory.max',
      'projects[4].stop.gracePeriod',
    ])
      expect(r.stderr).toContain(`${field}:`);
    nothingCreated();
  });

  test('missing, a directory and JSON nested 20 000 deep: exit 2 with a clear line, nothing created', async () => {
    const deep = path.join(dir, 'cli-deep.json');
    await fsp.writeFile(
      deep,
      `{"guest": ${'['.repeat(20_000)}${']'.repeat(20_000)}, "projects": []}`,
    );
    for (const [f, want] of [
      [path.join(dir, 'nope.yaml'), /ENOENT/],
      [dir, /not a regular file/],
      [deep, /problem/],
    ] as const) {
      const r = await run(f);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(want);
      expect(r.stderr).not.toMatch(/\n\s+at /); // a message, not a stack trace
    }
    nothingCreated();
  });
});
