/**
 * The guest config's cross-field checks (docs/config-guest.md), on the raw input so that
 * they run even where other fields failed: a bad name and a min above its max in the same
 * project are both reported.
 */
import type { Problem } from '../common/errors';
import { describe, parseCpus, parseDuration, parseSize, formatBytes } from '../common/units';
import {
  ENV_KEY_RE,
  checkCpuMax,
  checkEnvValue,
  checkMemoryMax,
  checkName,
  checkRelativeCgroupPath,
  rec,
  val,
} from './config-values';
import { fieldPath } from '../common/config-check';
import { GUEST_DEFAULTS } from './config-defaults';

const D = GUEST_DEFAULTS;

// ---------------------------------------------------------------------------------------
// Cross-field checks, on the raw input (so they run even where other fields failed)
// ---------------------------------------------------------------------------------------

export function crossChecks(raw: unknown): { problems: Problem[]; warnings: Problem[] } {
  const problems: Problem[] = [];
  const warnings: Problem[] = [];
  const top = rec(raw);
  if (!top) return { problems, warnings };
  const projects = Array.isArray(top.projects) ? top.projects : [];

  const seenNames = new Map<string, number>();
  const adoptedCgroups = new Map<string, number>();
  const adoptedPids = new Map<number, number>();
  let sumMemMin = 0;
  let sumCpuMin = 0;

  projects.forEach((p0, i) => {
    const p = rec(p0);
    if (!p) return;
    const f = (...rest: (string | number)[]) => fieldPath(['projects', i, ...rest]);

    const name = val(checkName(p.name));
    if (name !== undefined) {
      const first = seenNames.get(name);
      if (first !== undefined)
        problems.push({
          field: f('name'),
          value: name,
          message: `is already the name of projects[${first}]; names must be unique`,
        });
      else seenNames.set(name, i);
    }

    const mem = rec(p.memory);
    const memMin = mem && mem.min !== undefined ? val(parseSize(mem.min)) : 0;
    const memMax = mem && mem.max !== undefined ? val(checkMemoryMax(mem.max)) : 'max';
    if (memMin !== undefined && typeof memMax === 'number' && memMin > memMax)
      problems.push({
        field: f('memory', 'min'),
        value: mem?.min,
        message: `must not exceed memory.max (${formatBytes(memMax)}), got ${formatBytes(memMin)}`,
      });
    if (memMin !== undefined) sumMemMin += memMin;

    const cpu = rec(p.cpu);
    const cpuMin = cpu && cpu.min !== undefined ? val(parseCpus(cpu.min)) : 0;
    const cpuMax = cpu && cpu.max !== undefined ? val(checkCpuMax(cpu.max)) : 'max';
    if (cpuMin !== undefined && typeof cpuMax === 'number' && cpuMin > cpuMax)
      problems.push({
        field: f('cpu', 'min'),
        value: cpu?.min,
        message: `must not exceed cpu.max (${cpuMax} CPUs), got ${cpuMin}`,
      });
    if (cpuMin !== undefined) sumCpuMin += cpuMin;

    const hasCommand = p.command !== undefined;
    const hasAdopt = p.adopt !== undefined;
    if (hasCommand && hasAdopt)
      problems.push({
        field: f('adopt'),
        value: p.adopt,
        message: 'must not be given together with command: a project is either started or adopted',
      });
    if (!hasCommand && !hasAdopt)
      problems.push({
        field: f('command'),
        value: undefined,
        message: 'is required unless adopt is given (a project is either started or adopted)',
      });
    const restart = rec(p.restart);
    const policy = typeof p.restart === 'string' ? p.restart : restart?.policy;
    if (hasAdopt && (policy === 'on-failure' || policy === 'always'))
      problems.push({
        field: f('restart'),
        value: p.restart,
        message: 'must be no for an adopted project: there is no command to start it again',
      });
    if (restart && restart.maxDelay !== undefined) {
      const d = val(parseDuration(restart.delay ?? GUEST_DEFAULTS.project.restart.delayMs));
      const m = val(parseDuration(restart.maxDelay));
      if (d !== undefined && m !== undefined && m < d)
        problems.push({
          field: f('restart', 'maxDelay'),
          value: restart.maxDelay,
          message: `must not be below restart.delay (${d} ms), got ${m} ms`,
        });
    }
    if (hasAdopt && p.restartOnRestore === true)
      problems.push({
        field: f('restartOnRestore'),
        value: true,
        message: 'cannot be true for an adopted project: there is no command to start it again',
      });

    const command = rec(p.command);
    if (command) {
      const a0 = Array.isArray(command.argv) ? command.argv[0] : undefined;
      if (typeof a0 === 'string' && !a0.startsWith('/'))
        problems.push({
          field: f('command', 'argv', 0),
          value: a0,
          message: `must be an absolute path (nothing is looked up in PATH), got ${describe(a0)}`,
        });
      const env = rec(command.env);
      if (env)
        for (const [k, v] of Object.entries(env)) {
          if (!ENV_KEY_RE.test(k))
            problems.push({
              field: f('command', 'env', k),
              value: k,
              message: `is not a valid environment variable name (${ENV_KEY_RE.source})`,
            });
          const r = checkEnvValue(v);
          if (!r.ok) problems.push({ field: f('command', 'env', k), value: v, message: r.message });
        }
    }
    const preStop = rec(rec(p.stop)?.preStop);
    if (preStop && Array.isArray(preStop.command)) {
      const a0 = preStop.command[0];
      if (typeof a0 === 'string' && !a0.startsWith('/'))
        problems.push({
          field: f('stop', 'preStop', 'command', 0),
          value: a0,
          message: `must be an absolute path (nothing is looked up in PATH), got ${describe(a0)}`,
        });
    }

    const adopt = rec(p.adopt);
    if (adopt) {
      if ((adopt.cgroup === undefined) === (adopt.pids === undefined))
        problems.push({
          field: f('adopt'),
          value: p.adopt,
          message: 'must give exactly one of cgroup or pids',
        });
      const cg = val(checkRelativeCgroupPath(adopt.cgroup));
      if (cg !== undefined) {
        if (cg === 'agent' || cg.startsWith('agent/'))
          problems.push({
            field: f('adopt', 'cgroup'),
            value: cg,
            message: `is the agent's own leaf; a project cannot adopt it`,
          });
        const first = adoptedCgroups.get(cg);
        if (first !== undefined)
          problems.push({
            field: f('adopt', 'cgroup'),
            value: cg,
            message: `is already adopted by projects[${first}]`,
          });
        else adoptedCgroups.set(cg, i);
      }
      if (Array.isArray(adopt.pids))
        adopt.pids.forEach((pid, j) => {
          if (typeof pid !== 'number') return;
          const first = adoptedPids.get(pid);
          if (first !== undefined)
            problems.push({
              field: f('adopt', 'pids', j),
              value: pid,
              message: `is already adopted by projects[${first}]`,
            });
          else adoptedPids.set(pid, i);
        });
    }
  });

  // Minimums above the configured allocation: a WARNING, not an error. The allocation
  // changes at runtime (a reclaim may leave the guest smaller than this file says), and
  // the planner has a defined answer: the lowest-priority projects whose minimum does not
  // fit are not started. Refusing to start would make an agent restarted after a reclaim
  // fail to come up at all (docs/config-guest.md, "Minimums and the allocation").
  const res = rec(top.resources);
  const reserve = rec(top.reserve);
  const resMem = res ? val(parseSize(res.memory)) : undefined;
  const resCpus = res ? val(parseCpus(res.cpus)) : undefined;
  const rsvMem =
    reserve?.memory !== undefined ? val(parseSize(reserve.memory)) : D.reserve.memoryBytes;
  const rsvCpus = reserve?.cpus !== undefined ? val(parseCpus(reserve.cpus)) : D.reserve.cpus;
  if (resMem !== undefined && rsvMem !== undefined) {
    if (rsvMem >= resMem)
      problems.push({
        field: 'reserve.memory',
        value: reserve?.memory ?? formatBytes(rsvMem),
        message: `must be below resources.memory (${formatBytes(resMem)}), got ${formatBytes(rsvMem)}`,
      });
    else if (sumMemMin > resMem - rsvMem)
      warnings.push({
        field: 'projects[*].memory.min',
        value: sumMemMin,
        message: `the minimums add up to ${formatBytes(sumMemMin)}, above the ${formatBytes(resMem - rsvMem)} left after the reserve: the lowest-priority projects will not run`,
      });
  }
  if (resCpus !== undefined && rsvCpus !== undefined) {
    if (rsvCpus >= resCpus)
      problems.push({
        field: 'reserve.cpus',
        value: reserve?.cpus ?? rsvCpus,
        message: `must be below resources.cpus (${resCpus}), got ${rsvCpus}`,
      });
    else if (sumCpuMin > resCpus - rsvCpus + 1e-9)
      warnings.push({
        field: 'projects[*].cpu.min',
        value: sumCpuMin,
        message: `the minimums add up to ${sumCpuMin} CPUs, above the ${resCpus - rsvCpus} left after the reserve: the lowest-priority projects will not run`,
      });
  }
  return { problems, warnings };
}
