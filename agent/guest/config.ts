/**
 * The guest agent's local config (`/etc/nestbroker/guest.yaml`, docs/config-guest.md).
 *
 * Validated once at start by the config layer the host broker shares
 * (agent/common/config-check.ts), with EVERY problem reported together: a zod schema of
 * `.strict()` objects finds shapes, unknown keys and single values; the cross-field checks
 * run on the raw input beside it, so that a bad name and a min above its max in the same
 * project are both reported. The result is fully normalised (bytes and CPUs as numbers,
 * durations in ms) and deeply frozen.
 *
 * Reference: docs/config-guest.md (one row per key), example: examples/guest.yaml.
 */
import type { Problem } from '../common/errors';
import { checkConfig, deepFreeze, readConfigFile } from '../common/config-check';
import { formatBytes } from '../common/units';
import type { Resources } from '../broker/types';
import type { GuestConfig } from './config-types';
import { guestSchema, normalise } from './config-schema';
import { crossChecks } from './config-cross';

// The parts, one file each: the normalised types (config-types.ts), defaults and bounds
// (config-defaults.ts), single-value checks (config-values.ts), the schema
// (config-schema.ts), the cross-field checks (config-cross.ts); reading the file and
// turning zod's issues into problems is the layer the host config shares
// (agent/common/config-check.ts). This file validates and loads; the rest of the code
// imports from here.
export type {
  AdoptConfig,
  CommandConfig,
  GuestConfig,
  ProjectConfig,
  RestartConfig,
  RestartPolicy,
  Transport,
  UpstreamConfig,
} from './config-types';
export { GUEST_DEFAULTS } from './config-defaults';
export {
  NAME_RE,
  checkAbsolutePath,
  checkName,
  checkRelativeCgroupPath,
  checkSignal,
} from './config-values';
export { configKeys } from './config-schema';
export { deepFreeze, fieldPath } from '../common/config-check';

/**
 * Validate a parsed config. Throws NestError CONFIG_INVALID whose `problems` list every
 * problem found (field path, value received, message); returns a frozen, normalised config.
 */
export function validateGuestConfig(raw: unknown, source: string): GuestConfig {
  const { data, warnings } = checkConfig(guestSchema, raw, { source, cross: crossChecks });
  return deepFreeze(normalise(data, warnings, source));
}

/** Read, parse (YAML, which includes JSON) and validate a config file. */
export async function loadGuestConfig(file: string): Promise<GuestConfig> {
  return validateGuestConfig(await readConfigFile(file), file);
}

/** Warnings for an allocation only known at start (detected, or given by the host). */
export function minimumsAbove(cfg: GuestConfig, allocation: Resources): Problem[] {
  const net = {
    memoryBytes: allocation.memoryBytes - cfg.reserve.memoryBytes,
    cpus: allocation.cpus - cfg.reserve.cpus,
  };
  const mem = cfg.projects.reduce((s, p) => s + p.memory.min, 0);
  const cpus = cfg.projects.reduce((s, p) => s + p.cpu.min, 0);
  const out: Problem[] = [];
  if (mem > net.memoryBytes)
    out.push({
      field: 'projects[*].memory.min',
      value: mem,
      message: `the minimums add up to ${formatBytes(mem)}, above the ${formatBytes(Math.max(0, net.memoryBytes))} left after the reserve`,
    });
  if (cpus > net.cpus + 1e-9)
    out.push({
      field: 'projects[*].cpu.min',
      value: cpus,
      message: `the minimums add up to ${cpus} CPUs, above the ${Math.max(0, net.cpus)} left after the reserve`,
    });
  return out;
}
