/**
 * The pure parts of a reload (agent/guest/reload.ts, agent/host/reload.ts) and of the
 * guest's plan as the host receives it (agent/guest/plan-view.ts): which changes are
 * live and which need a restart, the limits a changed project gets, and a plan cut to
 * one protocol line. The running daemons are tested in test/integration/{guest,host}/reload.test.ts.
 */
import { validateGuestConfig } from '../../../agent/guest/config';
import { diffGuestConfig, effectiveConfig, limitsAfterChange } from '../../../agent/guest/reload';
import { initialLimits } from '../../../agent/guest/projects';
import { plan } from '../../../agent/guest/planner';
import { planResultBody } from '../../../agent/guest/plan-view';
import { validateHostConfig } from '../../../agent/host/config';
import { diffHostConfig, reloadProblems } from '../../../agent/host/reload';
import { MAX_LINE_BYTES } from '../../../agent/protocol/messages';
import { parseMessage } from '../../../agent/protocol/schemas';

const MiB = 1024 ** 2;

function guest(projects: Record<string, unknown>[], extra: Record<string, unknown> = {}) {
  return validateGuestConfig(
    {
      guest: 'vm1',
      upstream: { transport: 'none' },
      projects: projects.map((p) => ({ command: { argv: ['/bin/sleep', '1000'] }, ...p })),
      ...extra,
    },
    'test',
  );
}

describe('guest config diff', () => {
  const a = guest([
    { name: 'web', priority: 100, memory: { min: '128MiB', max: '1GiB' } },
    { name: 'batch', priority: 10 },
  ]);

  test('added, removed, changed projects; live keys; keys that need a restart', () => {
    const b = guest(
      [
        { name: 'web', priority: 90, memory: { min: '128MiB', max: '512MiB' } },
        { name: 'extra', priority: 50 },
      ],
      { socket: '/run/other.sock', logLevel: 'debug', usageInterval: '2s' },
    );
    const d = diffGuestConfig(a, b);
    expect(d.added.map((p) => p.name)).toEqual(['extra']);
    expect(d.removed.map((p) => p.name)).toEqual(['batch']);
    expect(d.changed).toMatchObject([
      { name: 'web', fields: ['memory', 'priority'], limits: true },
    ]);
    expect(d.live.map((l) => l.field)).toEqual(['logLevel']);
    expect(d.restart.map((r) => r.field).sort()).toEqual(['socket', 'usageInterval']);
    // In force: the new projects, the old socket and interval.
    const e = effectiveConfig(a, b);
    expect(e.socket).toBe(a.socket);
    expect(e.usageIntervalMs).toBe(a.usageIntervalMs);
    expect(e.projects.map((p) => p.name)).toEqual(['web', 'extra']);
    expect(Object.isFrozen(e)).toBe(true);
  });

  test('the same file is no change at all', () => {
    const d = diffGuestConfig(
      a,
      guest([
        { name: 'web', priority: 100, memory: { min: '128MiB', max: '1GiB' } },
        { name: 'batch', priority: 10 },
      ]),
    );
    expect(d).toEqual({ added: [], removed: [], changed: [], live: [], restart: [] });
  });

  test('a project adopted from another group counts as removed and added', () => {
    const b = guest([
      { name: 'web', priority: 100, memory: { min: '128MiB', max: '1GiB' } },
      {
        name: 'batch',
        priority: 10,
        command: undefined,
        adopt: { cgroup: 'other/batch' },
        restartOnRestore: false,
      },
    ]);
    const d = diffGuestConfig(a, b);
    expect(d.removed.map((p) => p.name)).toEqual(['batch']);
    expect(d.added.map((p) => p.name)).toEqual(['batch']);
  });
});

describe('limits of a changed project', () => {
  const [before] = guest([
    { name: 'web', priority: 1, memory: { max: '1GiB' }, cpu: { max: 2 } },
  ]).projects;
  const [after] = guest([
    { name: 'web', priority: 1, memory: { max: '512MiB' }, cpu: { max: 1 } },
  ]).projects;
  const [bigger] = guest([
    { name: 'web', priority: 1, memory: { max: '2GiB' }, cpu: { max: 4 } },
  ]).projects;

  test('not shrunk by a notice: the new config limits', () => {
    expect(limitsAfterChange(initialLimits(before), before, after)).toEqual({
      memoryHigh: 512 * MiB,
      memoryMax: 512 * MiB,
      cpuMax: 1,
    });
    expect(limitsAfterChange(initialLimits(before), before, bigger)).toEqual(initialLimits(bigger));
  });

  test('shrunk by a notice: stays shrunk, never above the new maximum', () => {
    const shrunk = { memoryHigh: 700 * MiB, memoryMax: 700 * MiB, cpuMax: 1.5, cpuset: '0' };
    expect(limitsAfterChange(shrunk, before, after)).toEqual({
      memoryHigh: 512 * MiB,
      memoryMax: 512 * MiB,
      cpuMax: 1,
      cpuset: '0',
    });
    expect(limitsAfterChange(shrunk, before, bigger)).toEqual(shrunk);
  });
});

describe('host config diff', () => {
  const host = (guests: Record<string, unknown>[], extra: Record<string, unknown> = {}) =>
    validateHostConfig({ guests, ...extra }, '/');
  const g = (name: string, more: Record<string, unknown> = {}) => ({
    name,
    priority: 10,
    allocation: { cpus: 2, memory: '1GiB' },
    channel: { transport: 'unix', path: `/run/${name}.sock` },
    ...more,
  });

  test('guests added, removed, changed; a new channel reconnects; the socket needs a restart', () => {
    const a = host([g('vm1'), g('vm2'), g('vm3')]);
    const b = host(
      [
        g('vm1', { priority: 20, floor: { cpus: 1, memory: '256MiB' } }),
        g('vm3', { channel: { transport: 'unix', path: '/run/vm3b.sock' } }),
        g('vm4'),
      ],
      { socket: '/run/h.sock', trigger: { enabled: false, cooldown: '5m' } },
    );
    const d = diffHostConfig(a, b);
    expect(d.added.map((x) => x.name)).toEqual(['vm4']);
    expect(d.removed.map((x) => x.name)).toEqual(['vm2']);
    expect(d.changed).toEqual([
      { name: 'vm1', fields: ['priority', 'floor'], reconnect: false },
      { name: 'vm3', fields: ['channel'], reconnect: true },
    ]);
    expect(d.restart.map((r) => r.field)).toEqual(['socket']);
    expect(d.live.map((r) => r.field)).toEqual(['trigger']);
    // vm2 has a notice in flight: refused, naming it.
    expect(reloadProblems(d, (n) => (n === 'vm2' ? ['vm2-3-ab'] : []), true)).toMatchObject([
      { field: 'guests[name=vm2]', value: ['vm2-3-ab'] },
    ]);
    expect(reloadProblems(d, () => [], true)).toEqual([]);
    // A guest with a cgroup on a broker that has no cgroup adapter.
    const withCgroup = diffHostConfig(
      a,
      host([g('vm1'), g('vm2'), g('vm3'), g('vm5', { cgroup: 'vm5.scope' })]),
    );
    expect(reloadProblems(withCgroup, () => [], false)).toMatchObject([
      { field: 'guests[name=vm5].cgroup' },
    ]);
  });
});

describe("the guest's plan in one protocol line", () => {
  const projects = Array.from({ length: 600 }, (_, i) => ({
    name: `p${String(i).padStart(3, '0')}`,
    priority: i,
    memory: { min: 16 * MiB, max: (64 * MiB) as number | 'max' },
    cpu: { min: 0.01, max: 1 as number | 'max', weight: 100 },
    state: 'running' as const,
    restartOnRestore: true,
    stoppedForRoom: false,
    limits: { memoryHigh: 64 * MiB, memoryMax: 64 * MiB, cpuMax: 1 },
  }));
  const p = plan(projects, {}, { memoryBytes: 4096 * MiB, cpus: 2 }, new Date());

  test('600 projects do not fit: the tail is left out and counted; the line parses', () => {
    const body = planResultBody(p, { memoryBytes: 4096 * MiB, cpus: 2 }, (n) => Number(n.slice(1)));
    expect(body.projects.length).toBeGreaterThan(50);
    expect(body.projects.length + (body.omitted ?? 0)).toBe(600);
    expect(body.omitted).toBeGreaterThan(0);
    const line = JSON.stringify({ type: 'plan-result', id: 'r1', replyTo: 'q1', ...body });
    expect(Buffer.byteLength(line)).toBeLessThan(MAX_LINE_BYTES);
    expect(parseMessage(line).ok).toBe(true);
    // In execution order: the first decisions (stops and shrinks) are the ones kept.
    expect(body.projects.map((x) => x.project)).toEqual(
      p.decisions.slice(0, body.projects.length).map((d) => d.project),
    );
  });

  test('a small plan goes whole', () => {
    const small = plan(projects.slice(0, 3), {}, { memoryBytes: 1024 * MiB, cpus: 2 }, new Date());
    const body = planResultBody(small, { memoryBytes: 1024 * MiB, cpus: 2 }, () => 1);
    expect(body.projects).toHaveLength(3);
    expect(body.omitted).toBeUndefined();
  });
});
