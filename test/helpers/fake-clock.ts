/**
 * A Clock (agent/common/clock.ts) the test drives: `advance` moves both clocks together
 * and wakes the sleepers that are due; `stepWall` moves only the wall clock, as NTP or
 * `date -s` would. Records every sleep asked for.
 */
import type { Clock } from '../../agent/common/clock';

export class FakeClock implements Clock {
  sleeps: number[] = [];
  private sleepers: { at: number; resolve: () => void }[] = [];

  constructor(
    public mono = 1_000_000,
    public wall = Date.parse('2026-01-01T00:00:00Z'),
  ) {}

  monotonic(): number {
    return this.mono;
  }

  now(): number {
    return this.wall;
  }

  stepWall(ms: number): void {
    this.wall += ms;
  }

  advance(ms: number): void {
    this.mono += ms;
    this.wall += ms;
    const due = this.sleepers.filter((s) => s.at <= this.mono);
    this.sleepers = this.sleepers.filter((s) => s.at > this.mono);
    for (const s of due) s.resolve();
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    this.sleeps.push(ms);
    return new Promise((resolve) => {
      if (signal?.aborted || ms <= 0) return resolve();
      const entry = { at: this.mono + ms, resolve };
      this.sleepers.push(entry);
      signal?.addEventListener(
        'abort',
        () => {
          this.sleepers = this.sleepers.filter((s) => s !== entry);
          resolve();
        },
        { once: true },
      );
    });
  }
}
