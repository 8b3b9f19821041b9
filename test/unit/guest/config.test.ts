/**
 * The guest config is refused with EVERY problem at once, each naming its field and the
 * value received; a good one comes back normalised and frozen.
 */
import { mkdtemp, rm, writeFile, mkdir, readFile } from 'fs/promises';
import { tmpdir } from 'os';
import * as path from 'path';
import {
  configKeys,
  GUEST_DEFAULTS,
  loadGuestConfig,
  minimumsAbove,
  validateGuestConfig,
  type GuestConfig,
} from '../../../agent/guest/config';
import { isNestError, type Problem } from '../../../agent/common/errors';

const ROOT = path.resolve(__dirname, '../../..');
const Mi = 1024 ** 2;

/** A valid config as plain data; each case breaks one thing in a fresh copy. */
function base(): Record<string, unknown> {
  return {
    guest: 'vm1',
    resources: { cpus: 2, memory: '2GiB' },
    projects: [
      {
        name: 'web',
        priority: 100,
        memory: { min: '256MiB', max: '1GiB' },
        cpu: { min: 0.5, max: 2, weight: 100 },
        command: { argv: ['/usr/bin/node', 'app.js'] },
      },
      {
        name: 'batch',
        priority: 10,
        memory: { min: '64MiB', max: 'max' },
        adopt: { cgroup: 'legacy/batch' },
      },
    ],
  };
}

function problemsOf(raw: unknown): Problem[] {
  try {
    validateGuestConfig(raw, 'test');
  } catch (e) {
    if (isNestError(e, 'CONFIG_INVALID')) return e.problems;
    throw e;
  }
  throw new Error('expected CONFIG_INVALID, the config was accepted');
}

type Edit = (c: Record<string, any>) => void; // eslint-disable-line @typescript-eslint/no-explicit-any

describe('a good config comes back normalised and frozen', () => {
  test('examples/guest.yaml validates, and says what it means in numbers', async () => {
    const c = await loadGuestConfig(path.join(ROOT, 'examples/guest.yaml'));
    expect(c.guest).toBe('vm1');
    expect(c.resources).toEqual({ cpus: 2, memoryBytes: 2048 * Mi });
    expect(c.reserve).toEqual({ cpus: 0, memoryBytes: 128 * Mi });
    expect(c.usageIntervalMs).toBe(1000);
    const web = c.projects.find((p) => p.name === 'web');
    expect(web).toMatchObject({
      memory: { min: 256 * Mi, max: 1024 * Mi },
      cpu: { min: 0.5, max: 2, weight: 200 },
      stop: {
        signal: 'SIGTERM',
        gracePeriodMs: 30_000,
        preStop: { command: ['/usr/local/bin/web-drain', '--wait'], timeoutMs: 10_000 },
      },
      notify: { signal: 'SIGUSR1' },
      command: { env: { NODE_ENV: 'production', PORT: '8080' }, user: 'www-data' },
      pidsMax: 512,
    });
    const metrics = c.projects.find((p) => p.name === 'metrics');
    expect(metrics).toMatchObject({
      memory: { max: 'max' },
      adopt: { cgroup: 'legacy/metrics' },
      restartOnRestore: false,
    });
    expect(c.warnings).toEqual([]);
  });

  test('the result is deeply frozen: nothing downstream can change the config', () => {
    const c = validateGuestConfig(base(), 'test');
    expect(Object.isFrozen(c)).toBe(true);
    expect(Object.isFrozen(c.projects[0].memory)).toBe(true);
    expect(() => {
      (c.projects as unknown as unknown[]).push({});
    }).toThrow(TypeError);
    expect(() => {
      (c.projects[0].memory as { min: number }).min = 0;
    }).toThrow(TypeError);
  });

  test('the smallest config gets every default from GUEST_DEFAULTS', () => {
    const c: GuestConfig = validateGuestConfig(
      { guest: 'g', projects: [{ name: 'p', priority: 0, command: { argv: ['/bin/true'] } }] },
      'minimal',
    );
    expect(c).toMatchObject({
      stateDir: GUEST_DEFAULTS.stateDir,
      runDir: GUEST_DEFAULTS.runDir,
      socket: GUEST_DEFAULTS.socket,
      socketGroup: 'root',
      projectSocket: GUEST_DEFAULTS.projectSocket,
      cgroup: { root: 'self', driver: 'auto' },
      reserve: GUEST_DEFAULTS.reserve,
      upstream: GUEST_DEFAULTS.upstream,
      usageIntervalMs: 1000,
      source: 'minimal',
    });
    expect(c.resources).toBeUndefined();
    expect(c.projects[0]).toEqual({
      name: 'p',
      priority: 0,
      memory: { min: 0, max: 'max' },
      cpu: { min: 0, max: 'max', weight: 100 },
      stop: { signal: 'SIGTERM', gracePeriodMs: 30_000 },
      restartOnRestore: true,
      restart: { policy: 'no', delayMs: 100, maxDelayMs: 100, burst: 5, intervalMs: 10_000 },
      command: { argv: ['/bin/true'], env: {} },
    });
  });

  test.each<[string, Edit, (c: GuestConfig) => unknown, unknown]>([
    [
      'signal without SIG',
      (c) => (c.projects[0].stop = { signal: 'int' }),
      (c) => c.projects[0].stop.signal,
      'SIGINT',
    ],
    [
      'duration in minutes',
      (c) => (c.projects[0].stop = { gracePeriod: '2m' }),
      (c) => c.projects[0].stop.gracePeriodMs,
      120_000,
    ],
    ['bare number duration is ms', (c) => (c.usageInterval = 250), (c) => c.usageIntervalMs, 250],
    [
      'decimal size',
      (c) => (c.projects[0].memory.max = '1.5GiB'),
      (c) => c.projects[0].memory.max,
      1536 * Mi,
    ],
    ['CPUs as a string', (c) => (c.projects[0].cpu.max = '1.5'), (c) => c.projects[0].cpu.max, 1.5],
    [
      'paths are normalised',
      (c) => (c.stateDir = '/var//lib/nb/'),
      (c) => c.stateDir,
      '/var/lib/nb',
    ],
    [
      'tls upstream',
      (c) =>
        (c.upstream = {
          transport: 'tls',
          listen: { host: '0.0.0.0', port: 7477 },
          tls: { cert: '/c', key: '/k', ca: '/a' },
        }),
      (c) => c.upstream,
      {
        transport: 'tls',
        listen: { host: '0.0.0.0', port: 7477 },
        tls: { cert: '/c', key: '/k', ca: '/a' },
      },
    ],
    [
      'no upstream (local operator only)',
      (c) => (c.upstream = { transport: 'none' }),
      (c) => c.upstream,
      { transport: 'none' },
    ],
    [
      'adopt by pids',
      (c) => (c.projects[1].adopt = { pids: [123, 456] }),
      (c) => c.projects[1].adopt,
      { pids: [123, 456] },
    ],
    ['socket group as gid', (c) => (c.socketGroup = 1000), (c) => c.socketGroup, 1000],
  ])('normalises %s', (_name, edit, get, want) => {
    const raw = base();
    edit(raw);
    expect(get(validateGuestConfig(raw, 'test'))).toEqual(want);
  });
});

describe('a bad config is refused with the field, the value and why', () => {
  test.each<[string, Edit, string, RegExp]>([
    // hostile names
    ['name ..', (c) => (c.projects[0].name = '..'), 'projects[0].name', /must match/],
    ['name ../../etc', (c) => (c.projects[0].name = '../../etc'), 'projects[0].name', /no "\/"/],
    ['name /', (c) => (c.projects[0].name = '/'), 'projects[0].name', /must match/],
    ['name with NUL', (c) => (c.projects[0].name = 'web\0x'), 'projects[0].name', /U\+0000/],
    [
      'name cgroup.procs',
      (c) => (c.projects[0].name = 'cgroup.procs'),
      'projects[0].name',
      /cgroup interface file/,
    ],
    [
      'name memory.max',
      (c) => (c.projects[0].name = 'memory.max'),
      'projects[0].name',
      /cgroup interface file/,
    ],
    [
      'name tasks (v1)',
      (c) => (c.projects[0].name = 'tasks'),
      'projects[0].name',
      /cgroup interface file/,
    ],
    [
      'name of 64 chars',
      (c) => (c.projects[0].name = 'a'.repeat(64)),
      'projects[0].name',
      /at most 63 characters, got 64/,
    ],
    [
      'name with a Cyrillic e',
      (c) => (c.projects[0].name = 'w\u0435b'),
      'projects[0].name',
      /U\+0435/,
    ],
    [
      'name with a fullwidth slash',
      (c) => (c.projects[0].name = 'a\uff0fb'),
      'projects[0].name',
      /U\+FF0F/,
    ],
    ['name uppercase', (c) => (c.projects[0].name = 'Web'), 'projects[0].name', /must match/],
    ['name a number', (c) => (c.projects[0].name = 7), 'projects[0].name', /must be a name, got 7/],
    ['guest name', (c) => (c.guest = '../vm'), 'guest', /must match/],
    [
      'duplicate names',
      (c) => (c.projects[1].name = 'web'),
      'projects[1].name',
      /already the name of projects\[0\]/,
    ],
    // hostile sizes
    ['size -1', (c) => (c.projects[0].memory.max = '-1'), 'projects[0].memory.max', /got "-1"/],
    [
      'size -1 as a number',
      (c) => (c.projects[0].memory.min = -1),
      'projects[0].memory.min',
      /got -1/,
    ],
    [
      'size 1e999',
      (c) => (c.projects[0].memory.max = '1e999'),
      'projects[0].memory.max',
      /got "1e999"/,
    ],
    [
      'size Infinity',
      (c) => (c.projects[0].memory.max = Infinity),
      'projects[0].memory.max',
      /got null|Infinity/,
    ],
    [
      'size 12XB',
      (c) => (c.projects[0].memory.min = '12XB'),
      'projects[0].memory.min',
      /unknown unit "XB"/,
    ],
    ['size 0 for max', (c) => (c.projects[0].memory.max = 0), 'projects[0].memory.max', /OOM kill/],
    [
      'min above max',
      (c) => (c.projects[0].memory = { min: '2GiB', max: '1GiB' }),
      'projects[0].memory.min',
      /must not exceed memory.max \(1GiB\), got 2GiB/,
    ],
    // CPUs
    ['cpu negative', (c) => (c.projects[0].cpu.min = -0.5), 'projects[0].cpu.min', /got -0.5/],
    [
      'cpu below a quota',
      (c) => (c.projects[0].cpu.max = 0.001),
      'projects[0].cpu.max',
      /at least 0.01/,
    ],
    [
      'cpu min above max',
      (c) => (c.projects[0].cpu = { min: 3, max: 2 }),
      'projects[0].cpu.min',
      /must not exceed cpu.max/,
    ],
    [
      'weight 0',
      (c) => (c.projects[0].cpu.weight = 0),
      'projects[0].cpu.weight',
      /from 1 to 10000, got 0/,
    ],
    [
      'weight 10001',
      (c) => (c.projects[0].cpu.weight = 10001),
      'projects[0].cpu.weight',
      /got 10001/,
    ],
    ['priority 1.5', (c) => (c.projects[0].priority = 1.5), 'projects[0].priority', /integer/],
    [
      'priority missing',
      (c) => delete c.projects[0].priority,
      'projects[0].priority',
      /is required/,
    ],
    // durations and signals
    [
      'grace 12XB',
      (c) => (c.projects[0].stop = { gracePeriod: '12XB' }),
      'projects[0].stop.gracePeriod',
      /got "12XB"/,
    ],
    [
      'grace -5s',
      (c) => (c.projects[0].stop = { gracePeriod: '-5s' }),
      'projects[0].stop.gracePeriod',
      /got "-5s"/,
    ],
    [
      'grace a year',
      (c) => (c.projects[0].stop = { gracePeriod: '9000h' }),
      'projects[0].stop.gracePeriod',
      /longer than a week/,
    ],
    [
      'preStop timeout 0',
      (c) => (c.projects[0].stop = { preStop: { command: ['/bin/x'], timeout: 0 } }),
      'projects[0].stop.preStop.timeout',
      /above 0/,
    ],
    ['usageInterval 1ms', (c) => (c.usageInterval = '1ms'), 'usageInterval', /from 100ms to 1h/],
    [
      'signal SIGFOO',
      (c) => (c.projects[0].stop = { signal: 'SIGFOO' }),
      'projects[0].stop.signal',
      /not a signal name/,
    ],
    [
      'signal number',
      (c) => (c.projects[0].stop = { signal: 15 }),
      'projects[0].stop.signal',
      /got 15/,
    ],
    [
      'stop signal SIGSTOP',
      (c) => (c.projects[0].stop = { signal: 'SIGSTOP' }),
      'projects[0].stop.signal',
      /cannot be SIGSTOP/,
    ],
    [
      'notify SIGKILL',
      (c) => (c.projects[0].notify = { signal: 'KILL' }),
      'projects[0].notify.signal',
      /cannot be SIGKILL/,
    ],
    // unknown keys, with a hint
    [
      'unknown top key',
      (c) => (c.projets = []),
      'projets',
      /not a known key \(did you mean "projects"\?\)/,
    ],
    ['unknown project key', (c) => (c.projects[0].prio = 1), 'projects[0].prio', /not a known key/],
    [
      'unknown nested key',
      (c) => (c.projects[0].memory.maximum = '1G'),
      'projects[0].memory.maximum',
      /not a known key/,
    ],
    ['snake_case key', (c) => (c.state_dir = '/x'), 'state_dir', /did you mean "stateDir"/],
    // command / adopt
    [
      'both command and adopt',
      (c) => (c.projects[0].adopt = { cgroup: 'x' }),
      'projects[0].adopt',
      /either started or adopted/,
    ],
    [
      'neither command nor adopt',
      (c) => delete c.projects[1].adopt,
      'projects[1].command',
      /is required unless adopt/,
    ],
    [
      'relative argv[0]',
      (c) => (c.projects[0].command.argv = ['node', 'app.js']),
      'projects[0].command.argv[0]',
      /absolute path/,
    ],
    [
      'empty argv',
      (c) => (c.projects[0].command.argv = []),
      'projects[0].command.argv',
      /at least/,
    ],
    [
      'NUL in an argument',
      (c) => (c.projects[0].command.argv = ['/bin/x', 'a\0b']),
      'projects[0].command.argv[1]',
      /NUL/,
    ],
    [
      'bad env name',
      (c) => (c.projects[0].command.env = { 'A-B': 'x' }),
      'projects[0].command.env.A-B',
      /environment variable name/,
    ],
    [
      'relative cwd',
      (c) => (c.projects[0].command.cwd = 'srv'),
      'projects[0].command.cwd',
      /absolute/,
    ],
    [
      'user with a space',
      (c) => (c.projects[0].command.user = 'www data'),
      'projects[0].command.user',
      /user name or a uid/,
    ],
    [
      'adopt ../',
      (c) => (c.projects[1].adopt = { cgroup: '../other' }),
      'projects[1].adopt.cgroup',
      /"\." or "\.\."/,
    ],
    [
      'adopt absolute',
      (c) => (c.projects[1].adopt = { cgroup: '/sys/fs/cgroup' }),
      'projects[1].adopt.cgroup',
      /relative/,
    ],
    [
      'adopt the agent leaf',
      (c) => (c.projects[1].adopt = { cgroup: 'agent' }),
      'projects[1].adopt.cgroup',
      /agent's own leaf/,
    ],
    [
      'adopt pid 1',
      (c) => (c.projects[1].adopt = { pids: [1] }),
      'projects[1].adopt.pids[0]',
      /from 2/,
    ],
    [
      'adopt both ways',
      (c) => (c.projects[1].adopt = { cgroup: 'x', pids: [5] }),
      'projects[1].adopt',
      /exactly one/,
    ],
    [
      'adopt and restart',
      (c) => (c.projects[1].restartOnRestore = true),
      'projects[1].restartOnRestore',
      /no command to start it again/,
    ],
    ['pidsMax 0', (c) => (c.projects[0].pidsMax = 0), 'projects[0].pidsMax', /got 0/],
    // paths, sockets, upstream
    ['relative stateDir', (c) => (c.stateDir = 'var/lib'), 'stateDir', /absolute/],
    ['stateDir with ..', (c) => (c.stateDir = '/var/../etc'), 'stateDir', /".."/],
    [
      'socket path too long',
      (c) => (c.socket = '/run/' + 'x'.repeat(120)),
      'socket',
      /at most 107/,
    ],
    [
      'cgroup root climbing out',
      (c) => (c.cgroup = { root: '../..' }),
      'cgroup.root',
      /"\." or "\.\."/,
    ],
    [
      'cgroup driver',
      (c) => (c.cgroup = { driver: 'v1' }),
      'cgroup.driver',
      /"auto", "v2", "hybrid"/,
    ],
    [
      'transport unknown',
      (c) => (c.upstream = { transport: 'serial' }),
      'upstream.transport',
      /"virtio-serial", "unix", "tls", "none"/,
    ],
    [
      'unix needs a path',
      (c) => (c.upstream = { transport: 'unix' }),
      'upstream.path',
      /is required/,
    ],
    [
      'tls key on virtio',
      (c) => (c.upstream = { transport: 'virtio-serial', tls: {} }),
      'upstream.tls',
      /known here: transport, path/,
    ],
    [
      'tls port 0',
      (c) =>
        (c.upstream = {
          transport: 'tls',
          listen: { host: 'h', port: 0 },
          tls: { cert: '/c', key: '/k', ca: '/a' },
        }),
      'upstream.listen.port',
      /got 0/,
    ],
    [
      'reserve above resources',
      (c) => (c.reserve = { memory: '4GiB' }),
      'reserve.memory',
      /below resources.memory \(2GiB\)/,
    ],
    [
      'projects not a list',
      (c) => (c.projects = { web: {} }),
      'projects',
      /must be a list, got a mapping/,
    ],
  ])('%s → %s', (_name, edit, field, message) => {
    const raw = base();
    edit(raw);
    const problems = problemsOf(raw);
    const hit = problems.find((p) => p.field === field);
    expect({ field, found: hit ? hit.message : problems }).toEqual({
      field,
      found: expect.stringMatching(message),
    });
  });

  test('every problem is reported at once, with its value, in one CONFIG_INVALID', () => {
    const raw = base() as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
    raw.guest = 'VM 1';
    raw.extra = true;
    raw.projects[0].name = '../../etc';
    raw.projects[0].memory = { min: '2GiB', max: '1GiB' };
    raw.projects[0].stop = { signal: 'SIGNOPE', gracePeriod: 'soon' };
    raw.projects[1].name = 'cgroup.procs';
    raw.projects[1].command = { argv: ['/bin/x'] };
    raw.projects.push({
      name: 'batch',
      priority: 1,
      memory: { max: '-1' },
      command: { argv: ['/x'] },
    });
    raw.projects.push({ name: 'batch', priority: 'high', adopt: { pids: [0] } });
    let err: unknown;
    try {
      validateGuestConfig(raw, '/etc/nestbroker/guest.yaml');
    } catch (e) {
      err = e;
    }
    expect(isNestError(err, 'CONFIG_INVALID')).toBe(true);
    const problems = (err as { problems: Problem[] }).problems;
    expect(problems.map((p) => p.field).sort()).toEqual(
      [
        'guest',
        'extra',
        'projects[0].name',
        'projects[0].memory.min',
        'projects[0].stop.signal',
        'projects[0].stop.gracePeriod',
        'projects[1].name',
        'projects[1].adopt',
        'projects[2].memory.max',
        'projects[3].name',
        'projects[3].priority',
        'projects[3].adopt.pids[0]',
      ].sort(),
    );
    expect(problems.find((p) => p.field === 'projects[2].memory.max')?.value).toBe('-1');
    expect(problems.find((p) => p.field === 'projects[0].name')?.value).toBe('../../etc');
    // The message is for people: source, count and one line per problem.
    const msg = (err as Error).message;
    expect(msg).toMatch(/^\/etc\/nestbroker\/guest.yaml: 12 problems:/);
    expect(msg).toContain('  projects[0].stop.signal: is not a signal name');
  });

  test.each([
    ['an empty document', null],
    ['a list', [1, 2]],
    ['a string', 'guest: vm1'],
  ])('a config that is %s is refused as a whole', (_n, raw) => {
    expect(problemsOf(raw)).toEqual([
      expect.objectContaining({
        field: '(top level)',
        message: expect.stringMatching(/must be a mapping/),
      }),
    ]);
  });
});

describe('minimums above the allocation: a warning, not a refusal', () => {
  test('the configured resources cannot hold every minimum: warned, the planner decides', () => {
    const raw = base() as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
    raw.resources = { cpus: 0.4, memory: '300MiB' };
    raw.reserve = { memory: '0', cpus: 0 };
    const c = validateGuestConfig(raw, 'test');
    expect(c.warnings.map((w) => w.field)).toEqual([
      'projects[*].memory.min',
      'projects[*].cpu.min',
    ]);
    expect(c.warnings[0].message).toMatch(/add up to 320MiB, above the 300MiB left/);
  });

  test('an allocation learnt at start (detected, or from the host) is checked the same way', () => {
    const c = validateGuestConfig(base(), 'test');
    expect(minimumsAbove(c, { memoryBytes: 2048 * Mi, cpus: 2 })).toEqual([]);
    expect(minimumsAbove(c, { memoryBytes: 300 * Mi, cpus: 0.25 }).map((w) => w.field)).toEqual([
      'projects[*].memory.min',
      'projects[*].cpu.min',
    ]);
  });
});

describe('loading the file', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'nestbroker-config-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test('a missing file is CONFIG_UNREADABLE naming the errno', async () => {
    await expect(loadGuestConfig(path.join(dir, 'nope.yaml'))).rejects.toMatchObject({
      code: 'CONFIG_UNREADABLE',
      problems: [{ field: '(file)', message: 'cannot be read: ENOENT' }],
    });
  });

  test('a directory is CONFIG_UNREADABLE', async () => {
    await mkdir(path.join(dir, 'd.yaml'));
    await expect(loadGuestConfig(path.join(dir, 'd.yaml'))).rejects.toMatchObject({
      code: 'CONFIG_UNREADABLE',
    });
  });

  test('broken YAML is CONFIG_INVALID with the line', async () => {
    const f = path.join(dir, 'g.yaml');
    await writeFile(f, 'guest: vm1\nprojects:\n  - name: [unclosed\n');
    await expect(loadGuestConfig(f)).rejects.toMatchObject({
      code: 'CONFIG_INVALID',
      problems: [
        expect.objectContaining({ field: expect.stringMatching(/^\(line \d+, column \d+\)$/) }),
      ],
    });
  });

  test('a key given twice is refused, not silently overwritten', async () => {
    const f = path.join(dir, 'g.yaml');
    await writeFile(f, 'guest: vm1\nguest: vm2\nprojects: []\n');
    await expect(loadGuestConfig(f)).rejects.toMatchObject({ code: 'CONFIG_INVALID' });
  });

  test('an empty file is CONFIG_INVALID, saying so', async () => {
    const f = path.join(dir, 'g.yaml');
    await writeFile(f, '');
    await expect(loadGuestConfig(f)).rejects.toMatchObject({
      code: 'CONFIG_INVALID',
      problems: [{ field: '(top level)', message: expect.stringMatching(/empty document/) }],
    });
  });

  test('hostile values in YAML form are all reported (1e999, -1, 12XB)', async () => {
    const f = path.join(dir, 'g.yaml');
    await writeFile(
      f,
      [
        'guest: vm1',
        'projects:',
        '  - name: web',
        '    priority: 1',
        '    memory: { min: 1e999, max: -1 }',
        '    cpu: { max: 12XB }',
        '    command: { argv: [/bin/x] }',
      ].join('\n'),
    );
    const e = await loadGuestConfig(f).catch((x: unknown) => x);
    expect(isNestError(e, 'CONFIG_INVALID')).toBe(true);
    expect((e as { problems: Problem[] }).problems.map((p) => p.field).sort()).toEqual([
      'projects[0].cpu.max',
      'projects[0].memory.max',
      'projects[0].memory.min',
    ]);
  });
});

describe('docs/config-guest.md keeps in step with the schema', () => {
  test('one row per key, and no row for a key that does not exist', async () => {
    const doc = await readFile(path.join(ROOT, 'docs/config-guest.md'), 'utf8');
    const rows = [...doc.matchAll(/^\| `([^`]+)` \|/gm)].map((m) => m[1]);
    expect(rows.slice().sort()).toEqual(configKeys().sort());
  });

  test('the defaults in the docs are the ones in GUEST_DEFAULTS', async () => {
    const doc = await readFile(path.join(ROOT, 'docs/config-guest.md'), 'utf8');
    const row = (key: string) => doc.split('\n').find((l) => l.startsWith(`| \`${key}\` |`)) ?? '';
    expect(row('stateDir')).toContain(GUEST_DEFAULTS.stateDir);
    expect(row('runDir')).toContain(GUEST_DEFAULTS.runDir);
    expect(row('socket')).toContain(GUEST_DEFAULTS.socket);
    expect(row('projectSocket')).toContain(GUEST_DEFAULTS.projectSocket);
    expect(row('upstream.path')).toContain(GUEST_DEFAULTS.upstream.path);
    expect(row('reserve.memory')).toContain('64MiB');
    expect(row('usageInterval')).toContain('1s');
    expect(row('projects[].stop.gracePeriod')).toContain('30s');
    expect(row('projects[].stop.preStop.timeout')).toContain('10s');
    expect(row('projects[].cpu.weight')).toContain('100');
  });
});

test('metrics: off when absent; a bad host, port or key is named with its value', () => {
  expect(validateGuestConfig(base(), 'test').metrics).toBeUndefined();
  expect(
    validateGuestConfig({ ...base(), metrics: { host: '::1', port: 0 } }, 'test').metrics,
  ).toEqual({ host: '::1', port: 0 });
  const problems = problemsOf({ ...base(), metrics: { host: 'a b', port: 70000, tls: true } });
  expect(problems.map((p) => p.field).sort()).toEqual([
    'metrics.host',
    'metrics.port',
    'metrics.tls',
  ]);
  expect(problems.find((p) => p.field === 'metrics.port')?.value).toBe(70000);
});

describe('projects[].restart: the policy of a project that ends on its own', () => {
  const web = (restart: unknown): Record<string, unknown> => {
    const c = base();
    (c.projects as Record<string, unknown>[])[0].restart = restart;
    return c;
  };
  test.each<[string, unknown, unknown]>([
    [
      'the shorthand',
      'on-failure',
      { policy: 'on-failure', delayMs: 100, maxDelayMs: 100, burst: 5, intervalMs: 10_000 },
    ],
    [
      "YAML 1.1's no (false)",
      false,
      { policy: 'no', delayMs: 100, maxDelayMs: 100, burst: 5, intervalMs: 10_000 },
    ],
    [
      'the mapping',
      { policy: 'always', delay: '1s', maxDelay: '1m', burst: 3, interval: '5m' },
      { policy: 'always', delayMs: 1000, maxDelayMs: 60_000, burst: 3, intervalMs: 300_000 },
    ],
  ])('%s', (_what, restart, expected) => {
    expect(validateGuestConfig(web(restart), 'test').projects[0].restart).toEqual(expected);
  });

  test('every bad value at once, each named with its value', () => {
    const c = web({ policy: 'sometimes', delay: '-1s', burst: 0, interval: '0s', when: 'x' });
    const adopted = (c.projects as Record<string, unknown>[])[1];
    adopted.restart = 'always';
    const problems = problemsOf(c);
    expect(problems.map((p) => [p.field, p.value])).toEqual(
      expect.arrayContaining([
        ['projects[0].restart.policy', 'sometimes'],
        ['projects[0].restart.delay', '-1s'],
        ['projects[0].restart.burst', 0],
        ['projects[0].restart.interval', '0s'],
        ['projects[0].restart.when', 'x'],
        ['projects[1].restart', 'always'],
      ]),
    );
  });

  test('maxDelay below delay is refused', () => {
    const problems = problemsOf(web({ policy: 'always', delay: '2s', maxDelay: '1s' }));
    expect(problems.map((p) => p.field)).toEqual(['projects[0].restart.maxDelay']);
  });
});
