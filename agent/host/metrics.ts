/**
 * The host broker's Prometheus metrics (docs/architecture.md, "Observability"): notices by guest, kind
 * and final state; the cascade latency (issued → final, which includes the guest's work
 * and the VM's actuation); project stops by how they ended, as the guests reported them;
 * VM actuation steps that failed; the guests the automatic trigger passed over for not
 * being connected; and per guest whether it is connected and what the books grant it. Counters move on the broker's `finished` event; gauges are read from the books
 * at scrape time.
 *
 * A notice whose guest did its part but whose VM actuation had a failed step (the broker
 * records it `done` with `actuation.errors`) is counted with state `actuation_failed`, not
 * `done`: the VM may still hold what the books no longer grant.
 */
import { bootId, systemClock } from '../common/clock';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { addProcessMetrics, LATENCY_BUCKETS } from '../common/metrics';
import type { HostBroker, HostNoticeRecord } from './host-broker';
import type { Watcher } from './watcher';

export function hostMetrics(
  broker: HostBroker,
  guestNames: readonly string[] | (() => readonly string[]),
  watcher?: Pick<Watcher, 'skippedByGuest'>,
): Registry {
  // A function: the guests a reload added or removed (agent/host/reload.ts) at each scrape.
  const names = typeof guestNames === 'function' ? guestNames : () => guestNames;
  const registry = new Registry();
  const notices = new Counter({
    name: 'nestbroker_host_notices_total',
    help: 'Notices that reached a final state, by guest, kind and state (done, actuation_failed, partial, failed, late, refused, cancelled)',
    labelNames: ['guest', 'kind', 'state'],
    registers: [registry],
  });
  const cascade = new Histogram({
    name: 'nestbroker_host_cascade_seconds',
    help: 'From a notice issued to its final state: the guest carrying it out and the VM actuated',
    labelNames: ['guest', 'kind'],
    buckets: LATENCY_BUCKETS,
    registers: [registry],
  });
  const stops = new Counter({
    name: 'nestbroker_host_project_stops_total',
    help: "Project stops reported in guests' outcomes, by guest and how they ended",
    labelNames: ['guest', 'exit'],
    registers: [registry],
  });
  const actuationFailures = new Counter({
    name: 'nestbroker_host_actuation_failures_total',
    help: 'VM actuation steps that failed (cgroup limits, QMP balloon), by guest, step and error code',
    labelNames: ['guest', 'step', 'code'],
    registers: [registry],
  });
  broker.on('finished', (rec: HostNoticeRecord) => {
    const { guest, kind } = rec.notice;
    const failed = rec.actuation?.errors ?? [];
    const state = rec.state === 'done' && failed.length > 0 ? 'actuation_failed' : rec.state;
    notices.inc({ guest, kind, state });
    for (const e of failed) actuationFailures.inc({ guest, step: e.step, code: e.code });
    // On the monotonic clock when the notice was issued in this boot (it finishes now);
    // the wall timestamps only for one issued before a reboot.
    if (rec.issuedMono !== undefined && rec.bootId === bootId())
      cascade.observe(
        { guest, kind },
        Math.max(0, systemClock.monotonic() - rec.issuedMono) / 1000,
      );
    else {
      const from = Date.parse(rec.notice.issuedAt);
      const to = Date.parse(rec.finishedAt ?? new Date().toISOString());
      if (Number.isFinite(from) && Number.isFinite(to))
        cascade.observe({ guest, kind }, Math.max(0, to - from) / 1000);
    }
    for (const p of rec.outcome?.projects ?? [])
      if (p.action === 'stopped') stops.inc({ guest, exit: p.exit ?? 'unknown' });
  });
  new Gauge({
    name: 'nestbroker_host_guest_connected',
    help: '1 when the guest agent is connected and has said hello',
    labelNames: ['guest'],
    registers: [registry],
    collect() {
      this.reset();
      for (const g of names()) this.set({ guest: g }, broker.status(g).connected ? 1 : 0);
    },
  });
  // One metric per unit (Prometheus naming: the unit is in the name, never in a label).
  new Gauge({
    name: 'nestbroker_host_guest_granted_memory_bytes',
    help: 'The memory the books grant the guest now',
    labelNames: ['guest'],
    registers: [registry],
    collect() {
      this.reset();
      for (const g of names()) this.set({ guest: g }, broker.status(g).books.granted.memoryBytes);
    },
  });
  new Gauge({
    name: 'nestbroker_host_guest_granted_cpus',
    help: 'The CPUs the books grant the guest now',
    labelNames: ['guest'],
    registers: [registry],
    collect() {
      this.reset();
      for (const g of names()) this.set({ guest: g }, broker.status(g).books.granted.cpus);
    },
  });
  new Gauge({
    name: 'nestbroker_host_guest_pending_notices',
    help: 'Notices issued to the guest and not yet final',
    labelNames: ['guest'],
    registers: [registry],
    collect() {
      this.reset();
      for (const g of names()) this.set({ guest: g }, broker.status(g).pending.length);
    },
  });
  // The automatic trigger passed a guest over because its agent was not connected
  // (agent/host/trigger.ts): counted by the watcher, read at scrape time.
  new Counter({
    name: 'nestbroker_host_trigger_skipped_unreachable_total',
    help: 'Times the automatic trigger would have reclaimed from a guest but passed it over because its agent was not connected',
    labelNames: ['guest'],
    registers: [registry],
    collect() {
      this.reset();
      for (const g of names()) this.inc({ guest: g }, watcher?.skippedByGuest.get(g) ?? 0);
    },
  });
  addProcessMetrics(registry);
  return registry;
}
