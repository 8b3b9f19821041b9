/**
 * `nestctl plan VM` on the host shows the guest's own dry run, project by project
 * (docs/host-broker.md): the host asks the guest agent over the channel (`plan` →
 * `plan-result`, agent/protocol/messages.ts), with a real host broker and a real guest
 * agent as processes (test/faults/stack.ts). The plan must be the guest planner's (the
 * low-priority project is the one that stops), and nothing may change: the projects keep
 * running under the same kernel limits and no notice exists on either side. With the guest
 * away, the books still answer and the output says why the guest could not be asked.
 */
import { spawn } from 'node:child_process';
import { NESTCTL } from '../../../demo/stack';
import type { PlanResult } from '../../../agent/protocol/messages';
import { FaultStack, MiB, waitFor } from '../../faults/stack';

jest.setTimeout(90_000);

let s: FaultStack;

beforeAll(async () => {
  s = await FaultStack.started('host-plan', [
    {
      name: 'vm1',
      memory: '1GiB',
      projects: [
        { name: 'web', priority: 100, mode: 'graceful', memory: ['128MiB', '256MiB'] },
        { name: 'batch', priority: 10, mode: 'graceful', memory: ['128MiB', '256MiB'] },
      ],
    },
  ]);
});

afterAll(() => s?.teardown());

function hostctl(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [NESTCTL, '--socket', s.stack.hostSocket, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    c.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

test("the host's plan is the guest's, project by project, and changes nothing", async () => {
  const before = {
    web: s.projectLimits('vm1', 'web'),
    batch: s.projectLimits('vm1', 'batch'),
    procs: [s.procs('vm1', 'web'), s.procs('vm1', 'batch')],
  };
  expect(before.procs.every((p) => p.length > 0)).toBe(true);

  // 1 GiB - 800 MiB = 224 MiB for the guest, 192 MiB for its projects (32 MiB reserve):
  // web's minimum fits, batch's does not beside it.
  const r = await hostctl(['plan', 'vm1', '--memory', '800MiB', '--json']);
  expect(r.code).toBe(0);
  const p = JSON.parse(r.stdout) as { ok: boolean; guestPlan: PlanResult };
  expect(p.ok).toBe(true);
  expect(p.guestPlan.allocation.memoryBytes).toBe(224 * MiB);
  expect(p.guestPlan.projectAllocation.memoryBytes).toBe(192 * MiB);
  const by = Object.fromEntries(p.guestPlan.projects.map((x) => [x.project, x]));
  expect(by.batch).toMatchObject({ priority: 10, action: 'stopped' });
  expect(by.web.priority).toBe(100);
  expect(by.web.action).not.toBe('stopped');
  expect(by.web.after.memoryMax).toBeLessThanOrEqual(192 * MiB);
  expect(p.guestPlan.fits).toBe(false);

  const human = await hostctl(['plan', 'vm1', '--memory', '800MiB']);
  expect(human.code).toBe(0);
  expect(human.stdout).toMatch(/^batch\s+10\s+stopped\b/m);
  expect(human.stdout).toMatch(/^web\s+100\s+shrunk\b/m);
  expect(human.stdout).toContain('dry run: nothing was changed');

  // Nothing moved: same limits, same processes, no notice on either side.
  expect({
    web: s.projectLimits('vm1', 'web'),
    batch: s.projectLimits('vm1', 'batch'),
    procs: [s.procs('vm1', 'web'), s.procs('vm1', 'batch')],
  }).toEqual(before);
  expect(await s.hostNotices()).toEqual([]);
  expect(await s.guestNotices('vm1')).toEqual([]);
  expect(s.count('vm1', 'batch', 'term')).toBe(0);
});

test('a change the books refuse is not sent to the guest', async () => {
  const r = await hostctl(['plan', 'vm1', '--memory', '990MiB', '--json']);
  expect(r.code).toBe(5);
  const p = JSON.parse(r.stdout) as { ok: boolean; guestPlan: unknown; problems: unknown[] };
  expect(p.ok).toBe(false);
  expect(p.guestPlan).toBeNull();
  expect(p.problems.length).toBeGreaterThan(0);
});

test('with the guest away, the books answer and the output says why there is no guest plan', async () => {
  await s.stack.stopProc(s.run('vm1').proc);
  await waitFor('vm1 to be away', async () => {
    const r = await hostctl(['guests', '--json']);
    return !(JSON.parse(r.stdout) as { connected: boolean }[])[0].connected;
  });
  const r = await hostctl(['plan', 'vm1', '--memory', '800MiB']);
  expect(r.code).toBe(0);
  expect(r.stdout).toMatch(/vm1: 1GiB, 2 CPUs now → 224MiB, 2 CPUs after/);
  expect(r.stdout).toContain('not connected');
});
