/**
 * What the watcher reads, and when (docs/performance.md: an idle host broker spiked 15 % of
 * a core every 5 s reading usage and limits of all 50 VM cgroups each trigger interval,
 * even with the trigger off). With the trigger off there is no loop at all; a trigger tick
 * reads the host only; every VM's cgroup is read when `status` asks (observe()), once for
 * callers asking at the same time.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { silentLogger } from '../../../agent/common/log';
import { validateHostConfig, type HostConfig } from '../../../agent/host/config';
import { Watcher, type HostSource, type WatcherClock } from '../../../agent/host/watcher';
import type { CgroupAdapter, GroupUsage, Limits } from '../../../cgroup-adapter/types';

const MiB = 1024 * 1024;

/** Timers are recorded, never fired by themselves. */
class RecordingClock implements WatcherClock {
  timers: { ms: number; fn: () => void }[] = [];
  now = (): number => 1_000_000;
  setTimeout = (fn: () => void, ms: number): unknown => this.timers.push({ fn, ms });
  clearTimeout = (): void => undefined;
}

/** Records each cgroup read; answers fixed figures. */
class RecordingAdapter {
  reads: string[] = [];
  usage = async (group: string): Promise<GroupUsage> => {
    this.reads.push(`usage ${group}`);
    return {
      memoryCurrent: 300 * MiB,
      memoryEvents: { oom: 0, oomKill: 0 },
      cpuUsageUs: 0,
      cpuNrPeriods: 0,
      cpuNrThrottled: 0,
      cpuThrottledUs: 0,
      pids: 3,
    };
  };
  readLimits = async (group: string): Promise<Limits> => {
    this.reads.push(`limits ${group}`);
    return { memory: { max: 1024 * MiB } } as Limits;
  };
}

const source: HostSource = {
  usage: async () => ({ memAvailable: 4096 * MiB, memTotal: 8192 * MiB, cpuCount: 2 }),
  memoryPsi: async () => undefined,
};
const noBroker = {
  status: () => {
    throw new Error('a tick with the trigger off must not happen');
  },
  issue: () => Promise.reject(new Error('nothing may be issued')),
  notices: () => {
    throw new Error('a tick with the trigger off must not happen');
  },
};

let dir: string;
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

async function config(trigger: Record<string, unknown>): Promise<Readonly<HostConfig>> {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-watcher-od-'));
  return validateHostConfig({
    stateDir: path.join(dir, 'state'),
    trigger,
    guests: ['vm1', 'vm2'].map((name) => ({
      name,
      priority: 1,
      allocation: { cpus: 1, memory: '1GiB' },
      cgroup: `${name}.scope`,
      channel: { transport: 'unix', path: path.join(dir, `${name}.sock`) },
    })),
  });
}

test('trigger off: no loop, and nothing is read until status asks; then host and every VM once', async () => {
  const cfg = await config({ enabled: false });
  const clock = new RecordingClock();
  const adapter = new RecordingAdapter();
  const w = new Watcher(cfg, noBroker, adapter as unknown as CgroupAdapter, silentLogger(), {
    source,
    clock,
  });
  w.start();
  expect(clock.timers).toEqual([]);
  expect(adapter.reads).toEqual([]);
  expect(w.last()).toBeNull();

  // Two status calls at once share one read.
  const [a, b] = await Promise.all([w.observe(), w.observe()]);
  expect(b).toBe(a);
  expect(adapter.reads).toEqual([
    'usage vm1.scope',
    'limits vm1.scope',
    'usage vm2.scope',
    'limits vm2.scope',
  ]);
  expect(a.host).toMatchObject({ memoryAvailableBytes: 4096 * MiB, memoryTotalBytes: 8192 * MiB });
  expect(a.vms.map((v) => [v.guest, v.usage?.memoryCurrent, v.limits?.memory?.max])).toEqual([
    ['vm1', 300 * MiB, 1024 * MiB],
    ['vm2', 300 * MiB, 1024 * MiB],
  ]);
  expect(a.decision).toEqual({ fire: false, why: 'trigger disabled' });
  // The next status reads again (figures of that moment, not a cached sample).
  await w.observe();
  expect(adapter.reads).toHaveLength(8);
});

test('trigger on: a tick reads the host and the books, no VM cgroup', async () => {
  const cfg = await config({
    enabled: true,
    memoryAvailableBelow: '1GiB',
    interval: '5s',
    step: { memory: '128MiB' },
  });
  const clock = new RecordingClock();
  const adapter = new RecordingAdapter();
  const books = {
    granted: { cpus: 1, memoryBytes: 1024 * MiB },
    floor: { cpus: 0, memoryBytes: 0 },
  };
  const broker = { status: () => ({ books, pending: [] }), issue: noBroker.issue };
  const w = new Watcher(
    cfg,
    broker as unknown as ConstructorParameters<typeof Watcher>[1],
    adapter as unknown as CgroupAdapter,
    silentLogger(),
    { source, clock },
  );
  w.start();
  expect(clock.timers.map((t) => t.ms)).toEqual([0]);
  const s = await w.step();
  expect(s.decision).toEqual({ fire: false, why: 'no threshold crossed' });
  expect(adapter.reads).toEqual([]);
  expect((await w.observe()).decision).toBe(s.decision);
  expect(adapter.reads).toHaveLength(4);
  w.stop();
});
