/**
 * Supervision follows the usage sampler's tick (agent/guest/supervisor.ts, usage.ts): the
 * guest has one clock for "every usageInterval". Told as a story on jest's fake timers:
 * the supervisor runs no timer of its own, looks at every project when the sampler ticks,
 * and lets go of the ticks once stopped. A recording registry stands for the projects (the
 * supervisor's real effects, restarts on real processes, are test/integration/guest/
 * supervise.test.ts); the sampler is the real one over a recording adapter.
 */
import { EventEmitter, once } from 'node:events';
import type { CgroupAdapter, GroupUsage } from '../../../cgroup-adapter/types';
import { silentLogger } from '../../../agent/common/log';
import type { GuestConfig } from '../../../agent/guest/config';
import type { ProjectRegistry } from '../../../agent/guest/projects';
import { Supervisor, type ProjectEnd } from '../../../agent/guest/supervisor';
import { UsageSampler } from '../../../agent/guest/usage';

const INTERVAL_MS = 1000;

/** One project `web`, restart `no`; its group's pids as the test sets them; every look recorded. */
function recordingRegistry(events: string[]): { registry: ProjectRegistry; pids: number[] } {
  const state = { pids: [4242] };
  const registry = {
    hooks: undefined,
    pids: async (name: string) => {
      events.push(`look ${name}`);
      return [...state.pids];
    },
    config: () => ({
      name: 'web',
      command: { argv: ['/bin/true'] },
      restart: { policy: 'no', delayMs: 100, maxDelayMs: 1000, burst: 5, intervalMs: 10_000 },
    }),
    transientState: () => undefined,
    stoppedForRoom: () => false,
    stoppedByOperator: () => false,
    killEscaped: async () => [],
    setTransient: () => undefined,
  } as unknown as ProjectRegistry;
  return { registry, pids: state.pids };
}

const cfg = { projects: [{ name: 'web' }], usageIntervalMs: INTERVAL_MS } as unknown as GuestConfig;
const noAdapter = {} as CgroupAdapter;

beforeEach(() => jest.useFakeTimers());
afterEach(() => jest.useRealTimers());

test('the supervisor looks at the projects on each sampler tick, and on nothing else', async () => {
  const events: string[] = [];
  const { registry, pids } = recordingRegistry(events);
  const ticks = new EventEmitter();
  const sup = new Supervisor(cfg, registry, noAdapter, silentLogger(), () => 0);
  const ends: ProjectEnd[] = [];
  sup.on('ended', (e: ProjectEnd) => ends.push(e));

  await sup.start(ticks);
  expect(ticks.listenerCount('tick')).toBe(1);
  expect(events).toEqual(['look web']); // start: is it running already? yes
  events.length = 0;

  // Its group empties, with no exit the agent saw (a project re-adopted after a restart).
  pids.length = 0;
  // Ten intervals pass without a tick: no timer of the supervisor's own looks.
  await jest.advanceTimersByTimeAsync(10 * INTERVAL_MS);
  expect(events).toEqual([]);
  expect(ends).toEqual([]);

  // The sampler ticks: one round, which sees the end (not seen: a failure; restart no).
  const round = once(sup, 'round');
  ticks.emit('tick');
  expect(await round).toEqual([1]);
  expect(events).toEqual(['look web']);
  expect(ends).toEqual([
    { project: 'web', status: null, failure: true, action: 'stays-down', escaped: [] },
  ]);

  // Stopped: it lets go of the ticks.
  sup.stop();
  expect(ticks.listenerCount('tick')).toBe(0);
});

test('with the real sampler: each periodic sample, then one round of supervision after it', async () => {
  const events: string[] = [];
  const { registry } = recordingRegistry(events);
  // No sampleFiles: the sampler reads through usage() (usage.ts), which records.
  const adapter = {
    usage: async (group: string): Promise<GroupUsage> => {
      events.push(`sample ${group}`);
      return { memoryCurrent: 1, cpuUsageUs: 0 } as GroupUsage;
    },
  } as unknown as CgroupAdapter;
  const sampler = new UsageSampler(
    adapter,
    () => [{ name: 'web', group: 'projects/web' }],
    INTERVAL_MS,
    silentLogger(),
    () => Date.now(),
  );
  const sup = new Supervisor(cfg, registry, adapter, silentLogger(), () => 0);
  await sup.start(sampler);
  events.length = 0;
  try {
    const first = once(sup, 'round');
    sampler.start(); // the first sample at once
    await jest.advanceTimersByTimeAsync(0);
    await first;
    expect(events).toEqual(['sample projects/web', 'look web']);

    // Half an interval: neither samples nor looks.
    await jest.advanceTimersByTimeAsync(INTERVAL_MS / 2);
    expect(events).toEqual(['sample projects/web', 'look web']);

    const second = once(sup, 'round');
    await jest.advanceTimersByTimeAsync(INTERVAL_MS / 2);
    expect(await second).toEqual([2]);
    expect(events).toEqual(['sample projects/web', 'look web', 'sample projects/web', 'look web']);
  } finally {
    sampler.stop();
    sup.stop();
  }
  // Stopped: no more samples, no more looks.
  events.length = 0;
  await jest.advanceTimersByTimeAsync(5 * INTERVAL_MS);
  expect(events).toEqual([]);
});
