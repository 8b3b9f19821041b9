/**
 * `nestbroker guest` names each missing prerequisite for real removal: a fake /proc/cmdline
 * and sysfs tree, made lacking one thing after another.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { missingPrerequisites, type PrerequisitePaths } from '../../../agent/guest/prerequisites';
import { memTotalOf, readGuestFacts } from '../../../agent/guest/guest-facts';

let dir: string;
let paths: PrerequisitePaths;

/** A guest with everything: cmdline, ACPI, cpu0 (no online file, as on x86) and cpu1-2. */
function fullGuest(): void {
  writeFileSync(paths.cmdline, 'console=ttyS0 memhp_default_state=online_movable quiet\n');
  mkdirSync(path.dirname(paths.autoOnlineBlocks), { recursive: true });
  writeFileSync(paths.autoOnlineBlocks, 'offline\n');
  mkdirSync(paths.acpi, { recursive: true });
  mkdirSync(path.join(paths.cpuRoot, 'cpu0'), { recursive: true });
  for (const c of ['cpu1', 'cpu2']) {
    mkdirSync(path.join(paths.cpuRoot, c), { recursive: true });
    writeFileSync(path.join(paths.cpuRoot, c, 'online'), '1\n');
  }
  writeFileSync(path.join(paths.cpuRoot, 'online'), '0-2\n');
}

beforeEach(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'nb-prereq-'));
  paths = {
    cmdline: path.join(dir, 'proc/cmdline'),
    autoOnlineBlocks: path.join(dir, 'sys/devices/system/memory/auto_online_blocks'),
    acpi: path.join(dir, 'sys/firmware/acpi'),
    cpuRoot: path.join(dir, 'sys/devices/system/cpu'),
  };
  mkdirSync(path.dirname(paths.cmdline), { recursive: true });
  fullGuest();
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

test('a guest with every prerequisite gets no warning', () => {
  expect(missingPrerequisites(paths)).toEqual([]);
  // auto_online_blocks instead of the command line does as well.
  writeFileSync(paths.cmdline, 'console=ttyS0\n');
  writeFileSync(paths.autoOnlineBlocks, 'online_movable\n');
  expect(missingPrerequisites(paths)).toEqual([]);
});

test('each missing prerequisite is one warning that names it and what was found', () => {
  writeFileSync(paths.cmdline, 'console=ttyS0 memhp_default_state=online\n');
  rmSync(paths.acpi, { recursive: true });
  rmSync(path.join(paths.cpuRoot, 'cpu2', 'online'));
  const missing = missingPrerequisites(paths);
  expect(missing.map((m) => m.name)).toEqual(['memory-online-movable', 'acpi', 'cpu-hotplug']);
  expect(missing[0].message).toContain('memhp_default_state=online_movable');
  expect(missing[0].message).toContain('"offline"');
  expect(missing[1].message).toContain(paths.acpi);
  expect(missing[2].message).toMatch(/^vCPU hot-unplug: cpu2 has no /);
});

test('the online CPUs and MemTotal are read as the kernel prints them', () => {
  const meminfo = path.join(dir, 'proc/meminfo');
  writeFileSync(meminfo, 'MemTotal:        2030456 kB\nMemFree:          100000 kB\n');
  expect(readGuestFacts({ cpuOnline: path.join(paths.cpuRoot, 'online'), meminfo })).toEqual({
    onlineCpus: [0, 1, 2],
    memTotal: 2030456 * 1024,
  });
  expect(memTotalOf('MemFree: 1 kB\n')).toBeUndefined();
  // A file that cannot be read leaves its field out, not a guess.
  expect(readGuestFacts({ cpuOnline: path.join(dir, 'nope'), meminfo })).toEqual({
    memTotal: 2030456 * 1024,
  });
});
