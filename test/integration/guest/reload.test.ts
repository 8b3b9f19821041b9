/**
 * A reload of a running guest agent (docs/config-guest.md, "Reload"): the real daemon gets
 * SIGHUP, as `systemctl reload` sends it (the unit's ExecReload=), after its config file
 * was rewritten. What must follow is read from the kernel and the projects' own marker
 * files, not from the agent's word:
 *
 *  - web's memory and CPU maximum lowered in the file → memory.limit_in_bytes and
 *    cpu.cfs_quota_us of its cgroup show the new values; web keeps running, unsignalled;
 *  - batch removed → its SIGTERM handler ran (gracefully stopped) and its cgroup is gone
 *    from every hierarchy;
 *  - extra added → its process runs inside its new cgroup;
 *  - a file with two problems → both logged, nothing in the kernel or the projects moves;
 *  - a change of the socket → named in a warning, the old socket still answers;
 *  - the daemon survives every SIGHUP and exits 0 on SIGTERM (not 129, SIGHUP's death).
 */
import { existsSync, readFileSync } from 'node:fs';
import * as path from 'node:path';
import { type TestAdapter } from '../../helpers/cgroup-root';
import {
  GuestUnderTest,
  nestctl,
  waitFor,
  writeConfig,
  type Env,
  type ProjectSpec,
} from './harness';

jest.setTimeout(60_000);

const MiB = 1024 ** 2;
let g: GuestUnderTest;
let t: TestAdapter;
let env: Env;

const WEB: ProjectSpec = {
  name: 'web',
  priority: 100,
  mode: 'graceful',
  memory: { min: '128MiB', max: '1GiB' },
  cpu: { min: 0.1, max: 1 },
};
const BATCH: ProjectSpec = { name: 'batch', priority: 10, mode: 'graceful', grace: '5s' };
const EXTRA: ProjectSpec = { name: 'extra', priority: 50, mode: 'graceful' };

const group = (p: string): string => `guest/projects/${p}`;
function kernel(p: string, h: string, f: string): string {
  return readFileSync(path.join(t.driver.paths(group(p))[h], f), 'utf8').trim();
}
const procs = (p: string): number[] =>
  kernel(p, 'unified', 'cgroup.procs').split('\n').filter(Boolean).map(Number);

/** Log lines of the agent (JSON: its stdout is a pipe) with this message. */
function logged(msg: string | RegExp): Record<string, unknown>[] {
  return g
    .agent!.stdout()
    .split('\n')
    .filter(Boolean)
    .map((l) => {
      try {
        return JSON.parse(l) as Record<string, unknown>;
      } catch {
        return {};
      }
    })
    .filter((o) => (typeof msg === 'string' ? o.msg === msg : msg.test(String(o.msg ?? ''))));
}

/** SIGHUP to the daemon's pid, then waits for the n-th reload to end (applied or refused). */
async function hup(n: number): Promise<void> {
  process.kill(g.agent!.pid, 'SIGHUP');
  await waitFor(
    `reload ${n} to finish`,
    () =>
      logged('reload: config applied').length +
        logged('reload refused: the config has problems; the config in force stays').length >=
      n,
    30_000,
  );
}

beforeAll(async () => {
  g = await GuestUnderTest.start('guest-reload', [WEB, BATCH], {
    ready: {
      what: 'web and batch to run',
      until: (e) => e.markerLines('web').length > 0 && e.markerLines('batch').length > 0,
    },
  });
  ({ t, env } = g);
});

afterAll(() => g?.dispose());

test('SIGHUP applies a changed, a removed and an added project; the kernel shows each', async () => {
  const webPid = procs('web')[0];
  expect(Number(kernel('web', 'memory', 'memory.limit_in_bytes'))).toBe(1024 * MiB);
  expect(Number(kernel('web', 'cpu', 'cpu.cfs_quota_us'))).toBe(100_000);
  const batchDirs = Object.values(t.driver.paths(group('batch')));
  expect(batchDirs.every((d) => existsSync(d))).toBe(true);

  await writeConfig(env, `${t.rootName}/guest`, [
    { ...WEB, memory: { min: '128MiB', max: '512MiB' }, cpu: { min: 0.1, max: 0.5 } },
    EXTRA,
  ]);
  await hup(1);

  // web: new limits in the kernel, the same process, never signalled.
  expect(Number(kernel('web', 'memory', 'memory.limit_in_bytes'))).toBe(512 * MiB);
  expect(Number(kernel('web', 'cpu', 'cpu.cfs_quota_us'))).toBe(50_000);
  expect(procs('web')).toContain(webPid);
  expect(env.markerLines('web').filter((l) => l.startsWith('term'))).toEqual([]);

  // batch: its SIGTERM handler ran; its cgroup is gone from every hierarchy.
  expect(env.markerLines('batch').filter((l) => l.startsWith('term'))).toHaveLength(1);
  expect(batchDirs.filter((d) => existsSync(d))).toEqual([]);

  // extra: running in its own new cgroup.
  await waitFor('extra to start', () => env.markerLines('extra').length > 0);
  const extraPid = Number(env.markerLines('extra')[0].split(' ')[2]);
  expect(procs('extra')).toEqual([extraPid]);

  // Every change was logged, and the operator's view follows the new config.
  expect(logged('reload: project removed (stopped, cgroup removed)')).toHaveLength(1);
  expect(logged('reload: project added')).toHaveLength(1);
  expect(logged('reload: project changed; limits rewritten')[0]).toMatchObject({
    project: 'web',
    fields: ['memory', 'cpu'],
  });
  const rows = JSON.parse((await nestctl(env, ['projects', '--json'])).stdout) as {
    name: string;
    state: string;
  }[];
  expect(rows.map((r) => [r.name, r.state]).sort()).toEqual([
    ['extra', 'running'],
    ['web', 'running'],
  ]);
  expect(g.agent!.child.exitCode).toBeNull();
});

test('an invalid config is refused with every problem logged; nothing changes', async () => {
  const before = {
    memory: kernel('web', 'memory', 'memory.limit_in_bytes'),
    cpu: kernel('web', 'cpu', 'cpu.cfs_quota_us'),
    web: procs('web'),
    extra: procs('extra'),
  };
  // Two problems: a misspelt key and a minimum above its maximum.
  await writeConfig(
    env,
    `${t.rootName}/guest`,
    [{ ...WEB, memory: { min: '2GiB', max: '256MiB' } }],
    { usageIntervall: '1s' },
  );
  await hup(2);
  const problems = logged(/^reload refused: (?!the config)/).map((o) => o.field);
  expect(problems).toEqual(
    expect.arrayContaining(['usageIntervall', expect.stringMatching(/memory/)]),
  );
  expect({
    memory: kernel('web', 'memory', 'memory.limit_in_bytes'),
    cpu: kernel('web', 'cpu', 'cpu.cfs_quota_us'),
    web: procs('web'),
    extra: procs('extra'),
  }).toEqual(before);
  expect(env.markerLines('extra').filter((l) => l.startsWith('term'))).toEqual([]);
  // nestctl says the same: refused, exit 2, both problems named.
  const r = await nestctl(env, ['reload']);
  expect(r.code).toBe(2);
  expect(r.stdout).toContain('reload refused (CONFIG_INVALID): the config in force stays');
  expect(r.stdout).toMatch(/^ {2}usageIntervall: /m);
  expect(r.stdout).toMatch(/^ {2}projects\[0\]\.memory/m);
  expect(g.agent!.child.exitCode).toBeNull();
});

test('nestctl --guest reload names what needs a restart; the old socket stays', async () => {
  await writeConfig(env, `${t.rootName}/guest`, [
    { ...WEB, memory: { min: '128MiB', max: '512MiB' }, cpu: { min: 0.1, max: 0.5 } },
    EXTRA,
  ]);
  // The socket's new path is in the file; the reload is asked for on the old one.
  const cfg = JSON.parse(readFileSync(env.configFile, 'utf8')) as Record<string, unknown>;
  cfg.socket = path.join(env.dir, 'other.sock');
  cfg.logLevel = 'warn';
  await import('node:fs/promises').then((f) =>
    f.writeFile(env.configFile, JSON.stringify(cfg, null, 2)),
  );
  const r = await nestctl(env, ['reload', '--json']);
  expect(r.code).toBe(0);
  const report = JSON.parse(r.stdout) as { ok: boolean; report: Record<string, unknown> };
  expect(report.ok).toBe(true);
  expect(report.report).toMatchObject({
    added: [],
    removed: [],
    changed: [],
    live: ['logLevel'],
    restartNeeded: ['socket'],
  });
  expect(logged(/^reload: socket cannot change/)).toHaveLength(1);
  expect(existsSync(path.join(env.dir, 'other.sock'))).toBe(false);
  // logLevel warn is in force: the next reload's info lines are not written, its warning is.
  const infos = logged('reload: reading the config').length;
  await nestctl(env, ['reload', '--json']);
  expect(logged('reload: reading the config')).toHaveLength(infos);
  expect(logged(/^reload: socket cannot change/)).toHaveLength(2);
});

test('a project the reload added is supervised like one from the start: its end is seen', async () => {
  const pid = procs('extra')[0];
  process.kill(pid, 'SIGKILL');
  await waitFor('extra to be seen ending', () =>
    logged('project ended on its own; stays down (its restart policy)').some(
      (l) => l.project === 'extra',
    ),
  );
});

test('the daemon outlived every SIGHUP and exits 0 on SIGTERM', async () => {
  expect(g.agent!.child.exitCode).toBeNull();
  await g.agent!.stop();
  expect(await g.agent!.exited).toBe(0);
  expect(g.agent!.child.signalCode).toBeNull();
});
