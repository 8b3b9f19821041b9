/**
 * `nestbroker host|guest --check --config FILE` through the real built CLI
 * (dist/agent/cli/nestbroker.js): a valid file exits 0 with a summary, a bad one exits 2
 * with every problem listed (a misspelt key with its "did you mean"), and nothing is
 * started or created: no state or run directory, no socket, no cgroup. The last test runs
 * the host broker on the same file without --check and sees it create what --check did
 * not, so the "nothing created" assertions are about real paths.
 */
import { spawn } from 'node:child_process';
import { existsSync, promises as fsp, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ensureBuilt, NESTBROKER, REPO } from '../guest/harness';
import { waitReady } from '../../../agent/cli/wait-ready';

jest.setTimeout(120_000);

const CGROUP_ROOT = `nestbroker-test-${process.pid}-check`;
const HIERARCHIES = ['unified', 'memory', 'cpu', 'cpuacct', 'cpuset', 'pids'];

let dir: string;

beforeAll(async () => {
  ensureBuilt();
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-check-'));
});

afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  pid: number;
}

function nestbroker(args: string[], onStart?: (pid: number) => void): Promise<Run> {
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, [NESTBROKER, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, NESTBROKER_LOG_FORMAT: 'json' },
    });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    c.on('error', reject);
    c.on('spawn', () => onStart?.(c.pid!));
    c.on('exit', (code) => resolve({ code, stdout, stderr, pid: c.pid! }));
  });
}

/** Where a daemon would write, all below `base`, none of it there yet. */
function places(base: string) {
  return {
    stateDir: path.join(base, 'state'),
    runDir: path.join(base, 'run'),
    socket: path.join(base, 'sock', 'daemon.sock'),
    projectSocket: path.join(base, 'sock', 'projects.sock'),
    channel: path.join(base, 'channel.sock'),
  };
}

/** The directory holds the config file and nothing else; no cgroup of ours exists. */
function nothingCreated(base: string, config: string): void {
  expect(readdirSync(base)).toEqual([path.basename(config)]);
  for (const h of HIERARCHIES)
    expect(existsSync(path.join('/sys/fs/cgroup', h, CGROUP_ROOT))).toBe(false);
}

async function configIn(name: string, body: (p: ReturnType<typeof places>) => object) {
  const base = path.join(dir, name);
  await fsp.mkdir(base);
  const file = path.join(base, 'config.json');
  await fsp.writeFile(file, JSON.stringify(body(places(base)), null, 2));
  return { base, file, p: places(base) };
}

const guestConfig = (p: ReturnType<typeof places>) => ({
  guest: 'vm1',
  stateDir: p.stateDir,
  runDir: p.runDir,
  socket: p.socket,
  projectSocket: p.projectSocket,
  cgroup: { root: `${CGROUP_ROOT}/guest` },
  resources: { cpus: 1, memory: '2GiB' },
  upstream: { transport: 'unix', path: p.channel },
  projects: [
    { name: 'web', priority: 100, command: { argv: ['/bin/sleep', '1000'] } },
    { name: 'batch', priority: 10, memory: { min: '128MiB' }, adopt: { pids: [4_000_000] } },
  ],
});

const hostConfig = (p: ReturnType<typeof places>) => ({
  stateDir: p.stateDir,
  socket: p.socket,
  socketMode: '0600',
  cgroup: { root: CGROUP_ROOT },
  guests: [
    {
      name: 'vm1',
      priority: 10,
      allocation: { cpus: 2, memory: '2GiB' },
      floor: { cpus: 1, memory: '512MiB' },
      channel: { transport: 'unix', path: p.channel },
    },
  ],
});

test('guest --check on a valid file: exit 0, a summary, nothing started or created', async () => {
  const { base, file, p } = await configIn('guest-good', guestConfig);
  for (const flag of ['--config', '-c']) {
    const r = await nestbroker(['guest', '--check', flag, file]);
    expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: '' });
    expect(r.stdout).toBe(
      [
        `${file}: valid guest config`,
        '  guest vm1, 2 projects (web, batch)',
        `  upstream unix ${p.channel}; operator socket ${p.socket}; state ${p.stateDir}`,
        '  resources 1 CPU, 2GiB (reserve 64MiB)',
        '',
      ].join('\n'),
    );
    nothingCreated(base, file);
  }
});

test('guest --check: a warning (minimums above the allocation) is printed, and the file is still valid', async () => {
  const { base, file } = await configIn('guest-warn', (p) => {
    const c = guestConfig(p);
    c.projects[1].memory = { min: '3GiB' };
    return c;
  });
  const r = await nestbroker(['guest', '--check', '-c', file]);
  expect(r.code).toBe(0);
  expect(r.stdout).toMatch(/valid guest config/);
  expect(r.stderr).toMatch(
    /^warning: projects\[\*\]\.memory\.min: the minimums add up to 3GiB, above the .* left after the reserve/,
  );
  nothingCreated(base, file);
});

test('a user or group this machine does not know: a warning naming the field (the file is valid)', async () => {
  const host = await configIn('host-nss', (p) => ({
    ...hostConfig(p),
    socketGroup: 'nb-no-such-group',
  }));
  const h = await nestbroker(['host', '--check', '-c', host.file]);
  expect(h.code).toBe(0);
  expect(h.stderr).toBe(
    'warning: socketGroup: no group "nb-no-such-group" (looked up through NSS: getent group); the start on this machine would fail (CONFIG_INVALID)\n',
  );
  nothingCreated(host.base, host.file);
  const guest = await configIn('guest-nss', (p) => {
    const c = guestConfig(p);
    (c.projects[0].command as Record<string, unknown>).user = 'nb-no-such-user';
    return c;
  });
  const g = await nestbroker(['guest', '--check', '-c', guest.file]);
  expect(g.code).toBe(0);
  expect(g.stderr).toMatch(
    /^warning: projects\[0\]\.command\.user: no user "nb-no-such-user" \(looked up through NSS: getent passwd\); the start on this machine would fail/,
  );
  nothingCreated(guest.base, guest.file);
});

test('host --check on a valid file: exit 0, a summary, nothing started or created', async () => {
  const { base, file, p } = await configIn('host-good', hostConfig);
  for (const flag of ['--config', '-c']) {
    const r = await nestbroker(['host', '--check', flag, file]);
    expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: '' });
    expect(r.stdout).toBe(
      [
        `${file}: valid host config`,
        '  1 guest (vm1 over unix)',
        `  operator socket ${p.socket}; state ${p.stateDir}; cgroup root ${CGROUP_ROOT}`,
        '  trigger off; metrics off',
        '',
      ].join('\n'),
    );
    nothingCreated(base, file);
  }
});

test('guest --check on a bad file: exit 2, every problem listed with its field, nothing created', async () => {
  const { base, file } = await configIn('guest-bad', (p) => {
    const c = guestConfig(p) as Record<string, unknown> & { projects: Record<string, unknown>[] };
    c.stat_dir = '/x'; // misspelt
    c.projects[0].priorty = 5; // misspelt, and priority now missing
    delete c.projects[0].priority;
    c.projects[1].memory = { min: '3GiB', max: '1GiB' }; // min above max
    c.usageInterval = '1ms';
    return c;
  });
  const r = await nestbroker(['guest', '--check', '--config', file]);
  expect(r.code).toBe(2);
  expect(r.stdout).toBe('');
  const lines = r.stderr.trimEnd().split('\n');
  expect(lines[0]).toBe(`nestbroker guest --check: (CONFIG_INVALID) ${file}: 5 problems:`);
  expect(lines.slice(1).map((l) => l.split(':')[0].trim())).toEqual(
    expect.arrayContaining([
      'stat_dir',
      'projects[0].priorty',
      'projects[0].priority',
      'projects[1].memory.min',
      'usageInterval',
    ]),
  );
  expect(r.stderr).toContain('stat_dir: is not a known key (did you mean "stateDir"?)');
  expect(r.stderr).toContain('projects[0].priorty: is not a known key (did you mean "priority"?)');
  expect(r.stderr).not.toMatch(/\n\s+at /); // problems, not a stack trace
  nothingCreated(base, file);
});

test('host --check on a bad file: exit 2, an unknown key and every other problem in one run', async () => {
  const { base, file } = await configIn('host-bad', (p) => {
    const c = hostConfig(p) as Record<string, unknown> & { guests: Record<string, unknown>[] };
    c.heartbeats = { interval: '1s' }; // misspelt
    c.socketMode = '0666'; // open to others
    c.guests[0].floor = { cpus: 4, memory: '512MiB' }; // above the allocation
    c.guests.push({ ...c.guests[0], floor: undefined, allocation: { cpus: 1, memory: 'lots' } });
    return c;
  });
  const r = await nestbroker(['host', '--check', '-c', file]);
  expect(r.code).toBe(2);
  expect(r.stdout).toBe('');
  expect(r.stderr).toContain(`(CONFIG_INVALID) ${file}: 6 problems:`);
  for (const line of [
    'heartbeats: is not a known key (did you mean "heartbeat"?)',
    'socketMode: must not give "other" users access to the operator socket, got "0666"',
    'guests[0].floor.cpus: must not exceed allocation.cpus (2), got 4',
    'guests[1].allocation.memory: ',
    'guests[1].name: is already the name of guests[0]',
    'guests[1].channel: is the same as guests[0].channel',
  ])
    expect(r.stderr).toContain(`  ${line}`);
  nothingCreated(base, file);
});

test('the daemons themselves refuse a bad file the same way: exit 2, the same problems, nothing created', async () => {
  const { base, file } = await configIn('host-bad-run', (p) => ({
    ...hostConfig(p),
    heartbeats: { interval: '1s' },
  }));
  const h = await nestbroker(['host', '-c', file]);
  expect(h.code).toBe(2);
  expect(h.stderr).toBe(
    `nestbroker host: config refused: ${file}: 1 problem:\n` +
      '  heartbeats: is not a known key (did you mean "heartbeat"?); known here: hypervisor, libvirt, stateDir, socket, socketGroup, socketMode, cgroup, heartbeat, reconnect, trigger, limits, metrics, logLevel, guests\n',
  );
  nothingCreated(base, file);
  const guest = await configIn('guest-bad-run', (p) => ({ ...guestConfig(p), stat_dir: '/x' }));
  const g = await nestbroker(['guest', '-c', guest.file]);
  expect(g.code).toBe(2);
  expect(g.stderr).toMatch(
    /^nestbroker guest: config refused: .*: 1 problem:\n {2}stat_dir: is not a known key \(did you mean "stateDir"\?\)/,
  );
  nothingCreated(guest.base, guest.file);
});

test('a file that is missing or not YAML: exit 2 with one clear line', async () => {
  const base = path.join(dir, 'unreadable');
  await fsp.mkdir(base);
  const broken = path.join(base, 'broken.yaml');
  await fsp.writeFile(broken, 'guests: [\n  - name: vm1\n  priority: 1\n');
  for (const daemon of ['host', 'guest']) {
    const missing = await nestbroker([daemon, '--check', '-c', path.join(base, 'nope.yaml')]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(
      /\(CONFIG_UNREADABLE\) .*nope\.yaml: cannot read the config \(ENOENT\)\n$/,
    );
    const bad = await nestbroker([daemon, '--check', '-c', broken]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(
      /\(CONFIG_INVALID\) .*broken\.yaml: \d+ problems?:\n {2}\(line \d+, column \d+\): /,
    );
  }
  expect(readdirSync(base)).toEqual(['broken.yaml']);
});

test('the shipped examples pass --check (docs/host-broker.md and docs/config-guest.md say so)', async () => {
  const host = await nestbroker(['host', '--check', '-c', path.join(REPO, 'examples/host.yaml')]);
  expect(host.code).toBe(0);
  expect(host.stdout).toMatch(/valid host config\n {2}2 guests \(vm1 over unix, db1 over tls\)/);
  const guest = await nestbroker([
    'guest',
    '--check',
    '-c',
    path.join(REPO, 'examples/guest.yaml'),
  ]);
  expect(guest.code).toBe(0);
  expect(guest.stdout).toMatch(/valid guest config\n {2}guest vm1, 3 projects/);
});

test('without --check the host broker does create its state directory and socket from the same file', async () => {
  const { base, file, p } = await configIn('host-run', hostConfig);
  let pid = 0;
  const exited = nestbroker(['host', '-c', file], (n) => (pid = n));
  try {
    await waitReady({ socket: p.socket, timeoutMs: 60_000, pid });
    expect(existsSync(p.stateDir)).toBe(true);
    expect(existsSync(p.socket)).toBe(true);
    expect(readdirSync(base).sort()).toEqual(['config.json', 'sock', 'state']);
  } finally {
    if (pid) process.kill(pid, 'SIGTERM');
  }
  expect((await exited).code).toBe(0);
  // Stopped cleanly: its socket is gone, its journal directory stays.
  expect(existsSync(p.socket)).toBe(false);
  expect(existsSync(p.stateDir)).toBe(true);
});

test('host --check with guests: auto: valid with libvirt, says where the guests come from', async () => {
  const { base, file } = await configIn('host-auto', (p) => ({
    hypervisor: 'libvirt',
    stateDir: p.stateDir,
    socket: p.socket,
    guests: 'auto',
  }));
  const r = await nestbroker(['host', '--check', '-c', file]);
  expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: '' });
  expect(r.stdout).toContain('guests: auto (every running libvirt domain');
  nothingCreated(base, file);
});
