/**
 * The margin a notice's end needs (agent/common/end-margin.ts), from what was measured:
 * priors until a kind is measured, then the worst of its recent samples (a slow fsync is
 * not averaged away, and ages out after KEEP newer ones), doubled; never more than half
 * of what the notice had left.
 */
import { EndMargin, FLOOR_MS, PRIORS, SAFETY, WRITES } from '../../../agent/common/end-margin';

test('unmeasured kinds count their prior; measured ones their worst recent sample', () => {
  const m = new EndMargin();
  expect(m.killMs()).toBe(SAFETY * PRIORS.kill);
  expect(m.afterMs()).toBe(SAFETY * (WRITES * PRIORS.journal + PRIORS.send) + FLOOR_MS);
  m.record('journal', 4);
  m.record('journal', 30);
  m.record('journal', 5);
  m.record('send', 1);
  m.record('kill', 12);
  expect(m.killMs()).toBe(24);
  expect(m.afterMs()).toBe(2 * (3 * 30 + 1) + FLOOR_MS);
  expect(m.snapshot()).toMatchObject({
    worst: { kill: 12, journal: 30, send: 1 },
    samples: { kill: 1, journal: 3, send: 1 },
  });
  // A slow write ages out once eight newer ones have been measured.
  for (let i = 0; i < 8; i++) m.record('journal', 2);
  expect(m.afterMs()).toBe(2 * (3 * 2 + 1) + FLOOR_MS);
  // Nonsense is not a sample.
  m.record('kill', -1);
  m.record('kill', Number.NaN);
  expect(m.snapshot().samples.kill).toBe(1);
});

test('the margin never takes more than half of the time a notice had left', () => {
  const m = new EndMargin();
  m.record('kill', 400);
  m.record('journal', 300);
  m.record('send', 100);
  // Uncapped: kill 800, after 2 × (900 + 100) + 10 = 2010; with 2 s left, 1 s in all.
  expect(m.forBudget(60_000)).toEqual({ killMs: 800, afterMs: 2010 });
  const capped = m.forBudget(2_000);
  expect(capped.killMs + capped.afterMs).toBeLessThanOrEqual(1_000);
  expect(capped.killMs).toBeGreaterThan(0);
  expect(m.forBudget(0)).toEqual({ killMs: 0, afterMs: 0 });
});
