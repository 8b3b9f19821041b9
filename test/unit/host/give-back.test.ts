/**
 * The give-back (hysteresis) as a story told by a clock (agent/host/trigger.ts
 * evaluateGiveBack): what the trigger took comes back one step at a time, only once the
 * pressure has stayed past the second threshold for `giveBack.after`, to the highest
 * priority reachable guest first, never more than it took nor than its books have room for.
 */
import {
  evaluateGiveBack,
  INITIAL_GIVE_BACK_STATE,
  type GiveBackCandidate,
  type GiveBackState,
} from '../../../agent/host/trigger';
import type { TriggerConfig } from '../../../agent/host/config';

const GiB = 1024 ** 3;
const cfg: TriggerConfig = {
  enabled: true,
  memoryAvailableBelowBytes: 2 * GiB,
  forMs: 30_000,
  step: { memoryBytes: 1 * GiB, cpus: 0 },
  deadlineMs: 60_000,
  intervalMs: 5_000,
  cooldownMs: 120_000,
  giveBack: { memoryAvailableAboveBytes: 4 * GiB, afterMs: 60_000 },
};
const guest = (
  name: string,
  priority: number,
  takenGiB: number,
  more: Partial<GiveBackCandidate> = {},
): GiveBackCandidate => ({
  name,
  priority,
  taken: { memoryBytes: takenGiB * GiB, cpus: 0 },
  room: { memoryBytes: 8 * GiB, cpus: 2 },
  busy: false,
  reachable: true,
  ...more,
});
const at = (now: number, availGiB: number) => ({ now, memoryAvailableBytes: availGiB * GiB });

test('not configured: never gives back', () => {
  const r = evaluateGiveBack({ ...cfg, giveBack: undefined }, INITIAL_GIVE_BACK_STATE, at(0, 16), [
    guest('a', 1, 2),
  ]);
  expect(r.decision).toEqual({ give: false, why: 'give-back not configured' });
});

test('the band between the thresholds is not "cleared": 3 GiB is above 2 but below 4', () => {
  const guests = [guest('a', 1, 2)];
  let s: GiveBackState = INITIAL_GIVE_BACK_STATE;
  for (const t of [0, 60_000, 120_000]) {
    const r = evaluateGiveBack(cfg, s, at(t, 3), guests);
    expect(r.decision).toEqual({ give: false, why: 'pressure not cleared' });
    s = r.state;
  }
  expect(s.clearSince).toBeNull();
});

test('cleared for `after`: one step to the highest-priority guest it took from; then `after` again', () => {
  const guests = [guest('batch', 10, 2), guest('web', 50, 1.5), guest('idle', 90, 0)];
  let r = evaluateGiveBack(cfg, INITIAL_GIVE_BACK_STATE, at(0, 5), guests);
  expect(r.decision).toEqual({
    give: false,
    why: 'pressure cleared for 0 ms of the 60000 ms required',
  });
  r = evaluateGiveBack(cfg, r.state, at(30_000, 5), guests);
  expect(r.decision.give).toBe(false);
  r = evaluateGiveBack(cfg, r.state, at(60_000, 5), guests);
  // `idle` has the highest priority but the trigger took nothing from it.
  expect(r.decision).toEqual({
    give: true,
    guest: 'web',
    change: { memoryBytes: 1 * GiB, cpus: 0 },
    reason: `automatic give-back: host MemAvailable ${5 * GiB} B ≥ ${4 * GiB} B for 60000 ms`,
  });
  expect(r.state).toEqual({ clearSince: null, lastGaveBackAt: 60_000 });
  // The next step needs another full `after`.
  r = evaluateGiveBack(cfg, r.state, at(65_000, 5), guests);
  expect(r.decision.give).toBe(false);
  r = evaluateGiveBack(cfg, r.state, at(125_000, 5), guests);
  expect(r.decision).toMatchObject({ give: true, guest: 'web' });
});

test('never more than it took, nor than the books have room for; pressure back resets the clock', () => {
  const half = [guest('web', 50, 0.5)];
  let r = evaluateGiveBack(cfg, { clearSince: 0, lastGaveBackAt: null }, at(60_000, 5), half);
  expect(r.decision).toMatchObject({ change: { memoryBytes: 0.5 * GiB, cpus: 0 } });
  const tight = [guest('web', 50, 2, { room: { memoryBytes: 0.25 * GiB, cpus: 0 } })];
  r = evaluateGiveBack(cfg, { clearSince: 0, lastGaveBackAt: null }, at(60_000, 5), tight);
  expect(r.decision).toMatchObject({ change: { memoryBytes: 0.25 * GiB, cpus: 0 } });
  // Under the trigger's own threshold again: not clear, the clock starts over.
  r = evaluateGiveBack(cfg, { clearSince: 0, lastGaveBackAt: null }, at(60_000, 1), half);
  expect(r).toEqual({
    state: { clearSince: null, lastGaveBackAt: null },
    decision: { give: false, why: 'pressure not cleared' },
  });
});

test('a notice in flight waits; an unreachable guest is passed over; nothing taken: nothing to give', () => {
  const s = { clearSince: 0, lastGaveBackAt: null };
  expect(
    evaluateGiveBack(cfg, s, at(60_000, 5), [guest('web', 50, 1, { busy: true })]).decision,
  ).toEqual({ give: false, why: 'a notice is still in flight; waiting for its outcome' });
  expect(
    evaluateGiveBack(cfg, s, at(60_000, 5), [
      guest('web', 50, 1, { reachable: false }),
      guest('batch', 10, 1),
    ]).decision,
  ).toMatchObject({ give: true, guest: 'batch' });
  expect(evaluateGiveBack(cfg, s, at(60_000, 5), [guest('web', 50, 0)]).decision).toEqual({
    give: false,
    why: 'nothing the trigger took is left to give back',
  });
});

test('missing data never clears: no MemAvailable reading, or PSI asked for and absent', () => {
  const s = { clearSince: 0, lastGaveBackAt: null };
  expect(evaluateGiveBack(cfg, s, { now: 60_000 }, [guest('web', 50, 1)]).decision.give).toBe(
    false,
  );
  const psi = { ...cfg, giveBack: { memoryPsiBelow: 5, afterMs: 60_000 } };
  expect(evaluateGiveBack(psi, s, at(60_000, 5), [guest('web', 50, 1)]).decision.give).toBe(false);
  expect(
    evaluateGiveBack(psi, s, { ...at(60_000, 5), memoryPsiSomeAvg10: 1 }, [guest('web', 50, 1)])
      .decision,
  ).toMatchObject({ give: true, reason: expect.stringContaining('PSI some avg10 1% < 5%') });
});
