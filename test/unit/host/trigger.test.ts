/**
 * The automatic trigger as a story told by a clock: pressure must last `for`, the
 * lowest-priority guest gives first, nobody goes below a floor, one notice at a time.
 */
import {
  evaluateTrigger,
  INITIAL_TRIGGER_STATE,
  type GuestCandidate,
  type TriggerState,
} from '../../../agent/host/trigger';
import type { TriggerConfig } from '../../../agent/host/config';

const GiB = 1024 ** 3;
const cfg: TriggerConfig = {
  enabled: true,
  memoryAvailableBelowBytes: 2 * GiB,
  memoryPsiAbove: 20,
  forMs: 30_000,
  step: { memoryBytes: 1 * GiB, cpus: 0.5 },
  deadlineMs: 60_000,
  intervalMs: 5_000,
  cooldownMs: 120_000,
};
const guest = (
  name: string,
  priority: number,
  memGiB: number,
  floorGiB: number,
  busy = false,
  reachable = true,
): GuestCandidate => ({
  name,
  priority,
  granted: { memoryBytes: memGiB * GiB, cpus: 2 },
  floor: { memoryBytes: floorGiB * GiB, cpus: 1 },
  busy,
  reachable,
});
const low = { now: 0, memoryAvailableBytes: 1 * GiB };

test('off unless configured: a disabled trigger never fires, whatever the pressure', () => {
  const r = evaluateTrigger({ ...cfg, enabled: false }, INITIAL_TRIGGER_STATE, low, [
    guest('a', 1, 4, 1),
  ]);
  expect(r.decision.fire).toBe(false);
});

test('low memory must last the configured time; then the lowest-priority guest gives one step', () => {
  const guests = [guest('web', 50, 4, 1), guest('batch', 10, 4, 1)];
  let s: TriggerState = INITIAL_TRIGGER_STATE;
  let r = evaluateTrigger(cfg, s, { ...low, now: 1_000 }, guests);
  expect(r.decision.fire).toBe(false);
  s = r.state;
  r = evaluateTrigger(cfg, s, { ...low, now: 20_000 }, guests);
  expect(r.decision).toMatchObject({ fire: false });
  s = r.state;
  r = evaluateTrigger(cfg, s, { ...low, now: 31_000 }, guests);
  expect(r.decision).toEqual({
    fire: true,
    guest: 'batch',
    change: { memoryBytes: 1 * GiB, cpus: 0.5 },
    reason: expect.stringContaining('MemAvailable'),
  });
});

test('a dip that recovers before the time is up resets the clock', () => {
  const guests = [guest('a', 1, 4, 1)];
  let r = evaluateTrigger(cfg, INITIAL_TRIGGER_STATE, { ...low, now: 0 }, guests);
  r = evaluateTrigger(cfg, r.state, { now: 20_000, memoryAvailableBytes: 8 * GiB }, guests);
  expect(r.state.breachSince).toBeNull();
  r = evaluateTrigger(cfg, r.state, { ...low, now: 40_000 }, guests);
  expect(r.decision.fire).toBe(false); // only 0 ms of the new breach
});

test('memory PSI alone can fire; missing data never does', () => {
  let r = evaluateTrigger(cfg, INITIAL_TRIGGER_STATE, { now: 0, memoryPsiSomeAvg10: 35 }, [
    guest('a', 1, 4, 1),
  ]);
  r = evaluateTrigger(cfg, r.state, { now: 30_000, memoryPsiSomeAvg10: 35 }, [guest('a', 1, 4, 1)]);
  expect(r.decision).toMatchObject({ fire: true, reason: expect.stringContaining('PSI') });
  const none = evaluateTrigger(cfg, INITIAL_TRIGGER_STATE, { now: 0 }, [guest('a', 1, 4, 1)]);
  expect(none.state.breachSince).toBeNull();
});

test('never below a floor: a guest at its floor is skipped, a guest near it gives only what is above', () => {
  const guests = [guest('atfloor', 1, 2, 2), guest('near', 5, 2.5, 2)];
  let r = evaluateTrigger(cfg, INITIAL_TRIGGER_STATE, { ...low, now: 0 }, guests);
  r = evaluateTrigger(cfg, r.state, { ...low, now: 30_000 }, guests);
  expect(r.decision).toMatchObject({
    fire: true,
    guest: 'near',
    change: { memoryBytes: 0.5 * GiB, cpus: 0.5 },
  });
  const all = [guest('x', 1, 2, 2), guest('y', 2, 1, 1)].map((g) => ({
    ...g,
    floor: { ...g.floor, cpus: 2 },
  }));
  let q = evaluateTrigger(cfg, INITIAL_TRIGGER_STATE, { ...low, now: 0 }, all);
  q = evaluateTrigger(cfg, q.state, { ...low, now: 30_000 }, all);
  expect(q.decision).toEqual({ fire: false, why: expect.stringContaining('floor') });
});

test('one notice at a time, then a cooldown before the next step', () => {
  const busy = [guest('a', 1, 4, 1, true), guest('b', 2, 4, 1)];
  let r = evaluateTrigger(cfg, INITIAL_TRIGGER_STATE, { ...low, now: 0 }, busy);
  r = evaluateTrigger(cfg, r.state, { ...low, now: 30_000 }, busy);
  expect(r.decision).toMatchObject({ fire: false, why: expect.stringContaining('in flight') });
  const free = [guest('a', 1, 4, 1), guest('b', 2, 4, 1)];
  r = evaluateTrigger(cfg, r.state, { ...low, now: 35_000 }, free);
  expect(r.decision.fire).toBe(true);
  r = evaluateTrigger(cfg, r.state, { ...low, now: 70_000 }, free);
  r = evaluateTrigger(cfg, r.state, { ...low, now: 101_000 }, free);
  expect(r.decision).toMatchObject({ fire: false, why: expect.stringContaining('cooling') });
  r = evaluateTrigger(cfg, r.state, { ...low, now: 160_000 }, free);
  expect(r.decision.fire).toBe(true);
});

test('a guest whose agent is not connected is passed over (and named); none reachable: no fire', () => {
  const state = { breachSince: -cfg.forMs, lastFiredAt: null };
  const r = evaluateTrigger(cfg, state, low, [
    guest('away', 1, 4, 1, false, false),
    guest('here', 50, 4, 1),
  ]);
  expect(r.decision).toMatchObject({ fire: true, guest: 'here', skippedUnreachable: ['away'] });
  const none = evaluateTrigger(cfg, state, low, [guest('away', 1, 4, 1, false, false)]);
  expect(none.decision).toMatchObject({ fire: false, skippedUnreachable: ['away'] });
  // No notice went out: no cooldown started.
  expect(none.state.lastFiredAt).toBeNull();
});
