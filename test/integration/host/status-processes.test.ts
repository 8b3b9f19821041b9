/**
 * `nestctl status` on a real host broker (test/faults/stack.ts): the machine's inventory
 * (systeminformation) and, with `--processes`, each VM's processes with their CPU share and
 * RSS (pidusage). In this stack a VM's cgroup holds its guest's projects (there is no QEMU
 * here); under libvirt it holds QEMU, in the scope's `emulator` group: either way the rows
 * must be exactly the processes the kernel lists in the VM's cgroup subtree, and the RSS the
 * kernel's. Without `--processes`, no process is read.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { NESTCTL } from '../../../demo/stack';
import type { VmProcesses } from '../../../agent/host/watcher';
import type { HostInventory } from '../../../cgroup-adapter/host-usage';
import { FaultStack, MiB } from '../../faults/stack';

jest.setTimeout(90_000);

let s: FaultStack;

beforeAll(async () => {
  s = await FaultStack.started('host-procs', [
    {
      name: 'vm1',
      projects: [
        { name: 'web', priority: 100, mode: 'graceful', holdMb: 64 },
        { name: 'batch', priority: 10, mode: 'graceful' },
      ],
    },
  ]);
});

afterAll(() => s?.teardown());

function hostctl(args: string[]): Promise<{ code: number | null; stdout: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [NESTCTL, '--socket', s.stack.hostSocket, ...args], {
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    let stdout = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.on('exit', (code) => resolve({ code, stdout }));
  });
}

const rssOf = (pid: number): number =>
  Number(/^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024;

test('status --processes: every process of the VM cgroup subtree, with its RSS', async () => {
  const r = await hostctl(['status', '--processes', '--json']);
  expect(r.code).toBe(0);
  const st = JSON.parse(r.stdout) as { inventory: HostInventory; processes: VmProcesses[] };
  expect(st.inventory).toMatchObject({ cpus: os.cpus().length, memTotalBytes: os.totalmem() });
  const vm1 = st.processes.find((v) => v.guest === 'vm1')!;
  const kernel = [...s.procs('vm1', 'web'), ...s.procs('vm1', 'batch')].sort();
  expect(kernel.length).toBeGreaterThanOrEqual(2);
  expect(vm1.processes.map((p) => p.pid).sort()).toEqual(kernel);
  const web = vm1.processes.find((p) => s.procs('vm1', 'web').includes(p.pid))!;
  // web holds 64 MiB of touched memory; the row is within a few MiB of the kernel's VmRSS.
  expect(web.rssBytes).toBeGreaterThan(64 * MiB);
  expect(Math.abs(web.rssBytes - rssOf(web.pid))).toBeLessThan(8 * MiB);
  expect(web.cmdline).toContain('project.js');
  // Largest RSS first: web (64 MiB held) before batch.
  expect(vm1.processes[0].pid).toBe(web.pid);

  const human = await hostctl(['status', '--processes']);
  expect(human.stdout.split('\n')[1]).toContain(`${os.cpus().length} CPUs`);
  expect(human.stdout).toMatch(new RegExp(`^vm1\\s+${web.pid}\\s+\\d+\\.\\d%\\s+\\d`, 'm'));
});

test('plain status reads no process: inventory yes, processes absent', async () => {
  const r = await hostctl(['status', '--json']);
  const st = JSON.parse(r.stdout) as { inventory: HostInventory | null; processes?: unknown };
  expect(st.inventory?.cpus).toBe(os.cpus().length);
  expect(st.processes).toBeUndefined();
});
