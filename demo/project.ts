#!/usr/bin/env node
/**
 * A demo project: a real process that holds memory, burns some CPU, and saves its work
 * when asked to stop (SIGTERM: writes a marker file, then exits 0). The guest agent
 * launches it into its project cgroup; `make demo` shows it shrunk or stopped.
 *
 *   node dist/demo/project.js --name batch --memory 48 --cpu 0.1 --marker /tmp/x/batch.done
 *
 * --memory is MiB to allocate and touch (counted by the cgroup), --cpu the share of one
 * CPU to burn (0..1), --marker where the work is saved on SIGTERM.
 */
import { writeFileSync } from 'node:fs';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1] : dflt;
}

const name = arg('name', 'project');
const memoryMiB = Number(arg('memory', '32'));
const cpu = Math.min(1, Math.max(0, Number(arg('cpu', '0.1'))));
const marker = arg('marker', '');
const started = Date.now();

// Memory: one buffer per MiB, every page written so the kernel really charges it.
const held: Buffer[] = [];
for (let i = 0; i < memoryMiB; i++) held.push(Buffer.alloc(1024 * 1024, i & 0xff));

// CPU: busy for `cpu` of every 100 ms slice, counting units of "work" done.
let work = 0;
const slice = setInterval(() => {
  const until = Date.now() + cpu * 100;
  while (Date.now() < until) work++;
}, 100);

process.on('SIGUSR1', () => {
  process.stdout.write(`${name}: project notice received\n`);
});

process.on('SIGTERM', () => {
  clearInterval(slice);
  if (marker) {
    writeFileSync(
      marker,
      JSON.stringify({
        name,
        pid: process.pid,
        work,
        heldMiB: held.length,
        ranMs: Date.now() - started,
        savedAt: new Date().toISOString(),
      }) + '\n',
    );
  }
  process.stdout.write(`${name}: SIGTERM, work saved, exiting\n`);
  process.exit(0);
});

process.stdout.write(
  `${name}: holding ${memoryMiB} MiB, burning ${cpu * 100}% of a CPU (pid ${process.pid})\n`,
);
