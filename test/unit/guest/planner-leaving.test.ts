/**
 * The planner told which CPUs the host will unplug (a reclaim's leavingCpus): every running
 * project's cpuset moves to the CPUs that stay, whatever it was; a stopped project's is not
 * written; once the CPUs are online again (the restore after a hot-plug) the cpusets grow
 * back to every online CPU. Pure: the leaving set and the online list are inputs.
 */
import { plan, type PlanProject } from '../../../agent/guest/planner';

const Mi = 1024 ** 2;
const NOW = new Date('2026-12-02T14:00:00Z');

function proj(name: string, priority: number, state: 'running' | 'stopped', cpuset?: string) {
  const p: PlanProject = {
    name,
    priority,
    memory: { min: 64 * Mi, max: 256 * Mi },
    cpu: { min: 0.1, max: 1, weight: 100 },
    state,
    restartOnRestore: false,
    stoppedForRoom: false,
    limits: { memoryHigh: 256 * Mi, memoryMax: 256 * Mi, cpuMax: 1 },
  };
  if (cpuset !== undefined) p.limits.cpuset = cpuset;
  return p;
}

const byName = (ds: { project: string }[]) =>
  Object.fromEntries(ds.map((d) => [d.project, d])) as Record<
    string,
    ReturnType<typeof plan>['decisions'][number]
  >;

test('CPU 1 leaves: the running projects get cpuset 0, a stopped one is not touched', () => {
  const p = plan(
    [proj('web', 100, 'running', '0-1'), proj('batch', 10, 'running'), proj('old', 1, 'stopped')],
    {},
    { cpus: 1, memoryBytes: 1024 * Mi },
    NOW,
    { onlineList: [0, 1], leavingCpus: [1] },
  );
  const d = byName(p.decisions);
  expect(d.web.after.cpuset).toBe('0');
  expect(d.web.action).toBe('shrunk');
  expect(d.batch.after.cpuset).toBe('0');
  expect(d.old.after).toEqual(d.old.before);
  expect(p.reasons.join('\n')).toContain('CPUs 1 will be unplugged: running projects get cpuset 0');
});

test('the boot CPU is not assumed: CPU 0 leaving moves the projects to CPU 1', () => {
  const p = plan(
    [proj('web', 100, 'running', '0-1')],
    {},
    { cpus: 1, memoryBytes: 1024 * Mi },
    NOW,
    { onlineList: [0, 1], leavingCpus: [0] },
  );
  expect(p.decisions[0].after.cpuset).toBe('1');
});

test('on four CPUs, 1 and 3 leaving: the projects keep 0 and 2', () => {
  const p = plan(
    [proj('web', 100, 'running', '0-3')],
    {},
    { cpus: 2, memoryBytes: 1024 * Mi },
    NOW,
    { onlineList: [0, 1, 2, 3], leavingCpus: [1, 3] },
  );
  expect(p.decisions[0].after.cpuset).toBe('0,2');
});

test('the restore after the hot-plug: every online CPU again, by number', () => {
  const p = plan(
    [proj('web', 100, 'running', '0'), proj('batch', 10, 'running', '0')],
    {},
    { cpus: 2, memoryBytes: 1024 * Mi },
    NOW,
    { onlineList: [0, 1] },
  );
  const d = byName(p.decisions);
  expect(d.web.after.cpuset).toBe('0-1');
  expect(d.batch.after.cpuset).toBe('0-1');
  expect(d.web.action).toBe('grown');
});

test('whole CPUs going away without a leaving set pin to the first online CPUs by number', () => {
  // CPU 1 was unplugged earlier; 0, 2, 3 online; the allocation drops to 2 CPUs.
  const p = plan(
    [proj('web', 100, 'running', '0,2-3')],
    {},
    { cpus: 2, memoryBytes: 1024 * Mi },
    NOW,
    { onlineList: [0, 2, 3] },
  );
  expect(p.decisions[0].after.cpuset).toBe('0,2');
});
