/**
 * The guest agent's Prometheus metrics (docs/architecture.md, "Observability"): notices by
 * outcome, the latency of carrying one out, project stops by how they ended, and per
 * project its usage and limits. Counters move on the notice book's events; the gauges are
 * read at scrape time from the usage sampler's last sample and the registry's limits, so a
 * scrape costs no cgroup read of its own.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { ChildProgress } from '../broker/broker';
import type { Outcome } from '../broker/types';
import type { NoticeBook } from '../client/notices';
import { addProcessMetrics, LATENCY_BUCKETS } from '../common/metrics';
import type { GuestConfig } from './config';
import type { ProjectRegistry } from './projects';
import type { UsageSampler } from './usage';
import type { ProjectEnd, Supervisor } from './supervisor';

export interface GuestMetricsSources {
  cfg: GuestConfig;
  book: NoticeBook;
  registry: ProjectRegistry;
  usage: UsageSampler;
  supervisor?: Supervisor;
  allocation: () => { memoryBytes: number; cpus: number };
}

const num = (v: number | 'max'): number => (v === 'max' ? Infinity : v);

export function guestMetrics(src: GuestMetricsSources): Registry {
  const registry = new Registry();
  registry.setDefaultLabels({ guest: src.cfg.guest });
  const notices = new Counter({
    name: 'nestbroker_guest_notices_total',
    help: 'Notices carried out by this guest agent, by kind and outcome status',
    labelNames: ['kind', 'status'],
    registers: [registry],
  });
  const noticeSeconds = new Histogram({
    name: 'nestbroker_guest_notice_seconds',
    help: 'From starting a notice to its outcome (plan, project notices, limits, stops)',
    labelNames: ['kind'],
    buckets: LATENCY_BUCKETS,
    registers: [registry],
  });
  const stops = new Counter({
    name: 'nestbroker_guest_project_stops_total',
    help: 'Project stops by how they ended: graceful (exited in its grace), killed, or escaped (processes found outside its cgroup, killed)',
    labelNames: ['project', 'exit'],
    registers: [registry],
  });
  src.book.on('outcome', (o: Outcome) => {
    const kind = src.book.get(o.noticeId)?.notice.kind ?? 'unknown';
    notices.inc({ kind, status: o.status });
    noticeSeconds.observe({ kind }, o.ms / 1000);
  });
  src.book.on('progress', (_id: string, ev: ChildProgress) => {
    if (ev.phase === 'stopped' && typeof ev.exit === 'string')
      stops.inc({ project: ev.child, exit: ev.exit });
  });

  // A project that ended on its own (agent/guest/supervisor.ts), and what its restart
  // policy made of it.
  const exits = new Counter({
    name: 'nestbroker_guest_project_exits_total',
    help: 'Projects whose processes all ended on their own (not stopped by a notice or an operator), by whether it counts as a failure and what the restart policy did',
    labelNames: ['project', 'failure', 'action'],
    registers: [registry],
  });
  const restarts = new Counter({
    name: 'nestbroker_guest_project_restarts_total',
    help: 'Projects started again by their restart policy',
    labelNames: ['project'],
    registers: [registry],
  });
  src.supervisor?.on('ended', (e: ProjectEnd) =>
    exits.inc({ project: e.project, failure: String(e.failure), action: e.action }),
  );
  src.supervisor?.on('restarted', (name: string) => restarts.inc({ project: name }));

  const names = (): string[] => src.cfg.projects.map((p) => p.name);
  new Gauge({
    name: 'nestbroker_guest_project_memory_bytes',
    help: 'Memory in use by the project (memory.current at the last usage sample)',
    labelNames: ['project'],
    registers: [registry],
    collect() {
      this.reset();
      const last = src.usage.last();
      for (const p of names())
        if (last[p] !== undefined) this.set({ project: p }, last[p].memoryBytes);
    },
  });
  new Gauge({
    name: 'nestbroker_guest_project_cpus',
    help: 'CPUs used by the project over the last usage interval',
    labelNames: ['project'],
    registers: [registry],
    collect() {
      this.reset();
      const last = src.usage.last();
      for (const p of names()) {
        const cpus = last[p]?.cpus;
        if (cpus !== undefined) this.set({ project: p }, cpus);
      }
    },
  });
  new Gauge({
    name: 'nestbroker_guest_project_memory_limit_bytes',
    help: 'The memory limits nestbroker set (high: reclaim above it; max: the hard limit); +Inf for none',
    labelNames: ['project', 'limit'],
    registers: [registry],
    collect() {
      this.reset();
      for (const p of names()) {
        const l = src.registry.limits(p);
        this.set({ project: p, limit: 'high' }, num(l.memoryHigh));
        this.set({ project: p, limit: 'max' }, num(l.memoryMax));
      }
    },
  });
  new Gauge({
    name: 'nestbroker_guest_project_cpu_limit_cpus',
    help: 'The CPU quota nestbroker set, in CPUs; +Inf for none',
    labelNames: ['project'],
    registers: [registry],
    collect() {
      this.reset();
      for (const p of names()) this.set({ project: p }, num(src.registry.limits(p).cpuMax));
    },
  });
  // One metric per unit (Prometheus naming: the unit is in the name, never in a label).
  new Gauge({
    name: 'nestbroker_guest_allocation_memory_bytes',
    help: "The guest's memory allocation as the host last set it",
    registers: [registry],
    collect() {
      this.set(src.allocation().memoryBytes);
    },
  });
  new Gauge({
    name: 'nestbroker_guest_allocation_cpus',
    help: "The guest's CPU allocation as the host last set it",
    registers: [registry],
    collect() {
      this.set(src.allocation().cpus);
    },
  });
  addProcessMetrics(registry);
  return registry;
}
