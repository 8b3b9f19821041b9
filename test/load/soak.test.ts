/**
 * Load held, short (docs/reliability.md): bench/soak.ts for 30 s in `make test`. 10 guest
 * agents and one host broker as real processes, 400 notices a minute (200 in all), each
 * guest alternating a CPU-only reclaim and a restore. Every notice answered `done` with a
 * complete outcome, none lost, none doubled (checked in both daemons' journals), no
 * project restarted, and the daemons' memory bounded. The ten-minute run, 20 guests at
 * 1 000 a minute, is `node dist/bench/soak.js` (figures in docs/reliability.md).
 */
import { runSoak } from '../../bench/soak';
import { ensureBuilt } from '../integration/guest/harness';

jest.setTimeout(60_000);

test('200 notices over 30 s across 10 guests: all answered, none lost or doubled, memory bounded', async () => {
  ensureBuilt();
  const r = await runSoak({
    guests: 10,
    ratePerMinute: 400,
    durationMs: 30_000,
    sampleEveryMs: 5_000,
    root: `nestbroker-test-${process.pid}-soak`,
  });
  const { samples, ...rss } = r.rss;
  // The figures, for the log of the run.
  process.stdout.write(`${JSON.stringify({ ...r, rss: { ...rss, samples: samples.length } })}\n`);
  expect(r.issued).toBe(200);
  expect(r.answered).toBe(r.issued);
  expect(r.done).toBe(r.issued);
  expect(r.complete).toBe(r.issued);
  expect(r.errors).toEqual([]);
  expect({ lost: r.lost, doubled: r.doubled }).toEqual({ lost: 0, doubled: 0 });
  expect(r.projectsRestarted).toBe(0);
  // Memory: no daemon grows without bound over the run (start-up sample excluded).
  const [h0, h1] = r.rss.hostFirstLastMiB;
  const [g0, g1] = r.rss.guestMeanFirstLastMiB;
  expect(h1 - h0).toBeLessThan(60);
  expect(g1 - g0).toBeLessThan(40);
  expect(Math.max(...samples.map((s) => s.hostMiB))).toBeLessThan(250);
});
