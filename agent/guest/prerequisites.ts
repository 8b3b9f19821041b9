/**
 * What a guest needs so that the host can really take resources away (docs/guest-agent.md,
 * "Prerequisites for real removal"): read at `nestbroker guest` start, one warning a
 * missing prerequisite, naming it. Nothing is refused for it: a guest without them still
 * works with quota CPUs and the balloon.
 *
 *   memory   virtio-mem hot-(un)plug wants hot-added memory in ZONE_MOVABLE, or the host's
 *            unplug finds unmovable pages in it: the kernel command line
 *            `memhp_default_state=online_movable`, or auto_online_blocks = online_movable
 *            (Documentation/admin-guide/mm/memory-hotplug.rst, "Onlining and Offlining
 *            Memory Blocks")
 *   acpi     vCPU hot-(un)plug under QEMU/libvirt goes through ACPI: /sys/firmware/acpi
 *   cpu      each CPU but the boot CPU can go offline: /sys/devices/system/cpu/cpuN/online
 *            (Documentation/core-api/cpu_hotplug.rst)
 */
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import * as path from 'node:path';

export interface PrerequisitePaths {
  cmdline: string;
  autoOnlineBlocks: string;
  acpi: string;
  cpuRoot: string;
}

export const DEFAULT_PREREQUISITE_PATHS: PrerequisitePaths = Object.freeze({
  cmdline: '/proc/cmdline',
  autoOnlineBlocks: '/sys/devices/system/memory/auto_online_blocks',
  acpi: '/sys/firmware/acpi',
  cpuRoot: '/sys/devices/system/cpu',
});

export interface MissingPrerequisite {
  /** Stable name, for logs and tests. */
  name: 'memory-online-movable' | 'acpi' | 'cpu-hotplug';
  /** One line for the operator: what is missing, what was found, what to set. */
  message: string;
}

function readOr(file: string): string | null {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return null;
  }
}

/** Every prerequisite for real removal that this guest lacks; [] when it has them all. */
export function missingPrerequisites(
  paths: PrerequisitePaths = DEFAULT_PREREQUISITE_PATHS,
): MissingPrerequisite[] {
  const out: MissingPrerequisite[] = [];
  const cmdline = readOr(paths.cmdline) ?? '';
  const onCmdline = cmdline.split(/\s+/).includes('memhp_default_state=online_movable');
  const auto = readOr(paths.autoOnlineBlocks)?.trim();
  if (!onCmdline && auto !== 'online_movable')
    out.push({
      name: 'memory-online-movable',
      message: `memory hot-unplug (virtio-mem): the kernel command line (${paths.cmdline}) has no memhp_default_state=online_movable and ${paths.autoOnlineBlocks} is ${auto === undefined ? 'absent' : JSON.stringify(auto)}, not "online_movable": hot-plugged memory may not be unpluggable again`,
    });
  if (!existsSync(paths.acpi))
    out.push({
      name: 'acpi',
      message: `vCPU hot-unplug: no ACPI (${paths.acpi} is absent): the host cannot unplug vCPUs (the domain needs <acpi/>)`,
    });
  let cpus: string[] = [];
  try {
    cpus = readdirSync(paths.cpuRoot).filter((n) => /^cpu[1-9][0-9]*$/.test(n));
  } catch {
    // no CPU directory at all: reported below as nothing hot-pluggable
  }
  const fixed = cpus
    .filter((n) => !existsSync(path.join(paths.cpuRoot, n, 'online')))
    .sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)));
  if (fixed.length > 0)
    out.push({
      name: 'cpu-hotplug',
      message: `vCPU hot-unplug: ${fixed.join(', ')} ha${fixed.length === 1 ? 's' : 've'} no ${path.join(paths.cpuRoot, '<cpu>', 'online')}: the kernel cannot take ${fixed.length === 1 ? 'it' : 'them'} offline (CONFIG_HOTPLUG_CPU)`,
    });
  return out;
}
