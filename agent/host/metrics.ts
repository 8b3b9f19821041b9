/**
 * The host broker's Prometheus metrics (docs/architecture.md, "Observability"): notices by
 * guest, kind and final state; the cascade latency (issued → final, which includes the
 * guest's work and the VM's actuation); project stops by how they ended, as the guests
 * reported them; and per guest whether it is connected and what the books grant it.
 * Counters move on the broker's `finished` event; gauges are read from the books at scrape
 * time.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { LATENCY_BUCKETS } from '../common/metrics';
import type { HostBroker, HostNoticeRecord } from './host-broker';

export function hostMetrics(broker: HostBroker, guests: readonly string[]): Registry {
  const registry = new Registry();
  const notices = new Counter({
    name: 'nestbroker_host_notices_total',
    help: 'Notices that reached a final state, by guest, kind and state (done, late, refused, cancelled)',
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
  broker.on('finished', (rec: HostNoticeRecord) => {
    const { guest, kind } = rec.notice;
    notices.inc({ guest, kind, state: rec.state });
    const from = Date.parse(rec.notice.issuedAt);
    const to = Date.parse(rec.finishedAt ?? new Date().toISOString());
    if (Number.isFinite(from) && Number.isFinite(to))
      cascade.observe({ guest, kind }, Math.max(0, to - from) / 1000);
    for (const p of rec.outcome?.projects ?? [])
      if (p.action === 'stopped') stops.inc({ guest, exit: p.exit ?? 'unknown' });
  });
  new Gauge({
    name: 'nestbroker_host_guest_connected',
    help: '1 when the guest agent is connected and has said hello',
    labelNames: ['guest'],
    registers: [registry],
    collect() {
      for (const g of guests) this.set({ guest: g }, broker.status(g).connected ? 1 : 0);
    },
  });
  new Gauge({
    name: 'nestbroker_host_guest_granted',
    help: 'What the books grant the guest now (memory in bytes, cpus)',
    labelNames: ['guest', 'resource'],
    registers: [registry],
    collect() {
      for (const g of guests) {
        const { granted } = broker.status(g).books;
        this.set({ guest: g, resource: 'memory_bytes' }, granted.memoryBytes);
        this.set({ guest: g, resource: 'cpus' }, granted.cpus);
      }
    },
  });
  new Gauge({
    name: 'nestbroker_host_guest_pending_notices',
    help: 'Notices issued to the guest and not yet final',
    labelNames: ['guest'],
    registers: [registry],
    collect() {
      for (const g of guests) this.set({ guest: g }, broker.status(g).pending.length);
    },
  });
  return registry;
}
