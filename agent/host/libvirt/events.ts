/**
 * Following libvirt's domain events with `virsh event --loop --all` (virsh(1), "event"):
 * one long-lived child process whose stdout is one event per line,
 *
 *   event 'lifecycle' for domain 'vm1': Started Booted
 *   event 'tunable' for domain 'vm1':
 *   	cputune.global_quota: 150000
 *
 * (continuation lines start with a tab). The host broker uses the life-cycle events to
 * know a domain went down or came back, so that it re-reads the channel's new socket path
 * at once instead of at the end of a backoff (docs/libvirt.md, "Life-cycle"). If virsh
 * dies (libvirtd restarted, the child killed), it is started again after `restartMs`,
 * and a `restart` event tells listeners to re-read every domain: events may have been
 * missed in between.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { silentLogger, type Logger } from '../../common/log';
import { DEFAULT_LIBVIRT_URI } from './virsh';

export interface DomainEvent {
  /** `lifecycle`, `tunable`, `device-removed`, `reboot`, … */
  type: string;
  domain: string;
  /** The rest of the first line (`Started Booted`), trimmed. */
  detail: string;
  /** Continuation lines, trimmed. */
  extra: string[];
}

const FIRST = /^event '([^']+)' for domain '([^']*)':?\s*(.*)$/;

/** Parses virsh event output, line by line (fed in any chunking). */
export class EventLineParser {
  private buf = '';
  private pending: DomainEvent | null = null;

  constructor(private readonly onEvent: (e: DomainEvent) => void) {}

  push(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).replace(/\r$/, '');
      this.buf = this.buf.slice(nl + 1);
      this.line(line);
    }
  }

  /** Emits an event still waiting for continuation lines (at the child's exit). */
  flush(): void {
    if (this.pending) {
      const e = this.pending;
      this.pending = null;
      this.onEvent(e);
    }
  }

  private line(line: string): void {
    if (/^\s/.test(line) && line.trim() !== '' && this.pending) {
      this.pending.extra.push(line.trim());
      return;
    }
    this.flush();
    const m = FIRST.exec(line);
    if (!m) return; // "events received: N" at exit, blank lines
    const e: DomainEvent = { type: m[1], domain: m[2], detail: m[3].trim(), extra: [] };
    // An event with its detail on the first line (lifecycle: "Started Booted") is whole
    // at its newline; one whose first line ends at the colon (tunable, job-completed) has
    // tab-indented lines after it, and is emitted at the next line that is not one.
    if (e.detail === '') this.pending = e;
    else this.onEvent(e);
  }
}

export interface DomainEventsOptions {
  uri?: string;
  binary?: string;
  /** Wait before starting virsh again after it exited. */
  restartMs?: number;
  log?: Logger;
}

export interface DomainEventsEvents {
  event: [DomainEvent];
  /** virsh was (re)started; after the first, events may have been missed. */
  spawn: [{ pid: number; restarts: number }];
  exit: [{ code: number | null; signal: string | null }];
}

export class DomainEvents extends EventEmitter {
  private child: ChildProcess | null = null;
  private timer: NodeJS.Timeout | null = null;
  private stopped = true;
  restarts = 0;
  private readonly log: Logger;

  constructor(private readonly opts: DomainEventsOptions = {}) {
    super();
    this.log = opts.log ?? silentLogger();
  }

  /** The running virsh's pid (for tests that kill it, and for logs). */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  start(): this {
    this.stopped = false;
    this.spawnChild();
    return this;
  }

  private spawnChild(): void {
    this.timer = null;
    if (this.stopped) return;
    const args = ['-c', this.opts.uri ?? DEFAULT_LIBVIRT_URI, 'event', '--loop', '--all'];
    const child = spawn(this.opts.binary ?? 'virsh', args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C' },
    });
    this.child = child;
    const parser = new EventLineParser((e) => this.emit('event', e));
    child.stdout?.setEncoding('utf8').on('data', (d: string) => parser.push(d));
    let stderr = '';
    child.stderr
      ?.setEncoding('utf8')
      .on('data', (d: string) => (stderr = (stderr + d).slice(-4096)));
    child.on('error', (err) => {
      // ENOENT (no virsh): logged; the exit handler below retries later.
      this.log.error({ err }, 'virsh event could not be started');
    });
    child.on('spawn', () => {
      this.log.info({ pid: child.pid, restarts: this.restarts }, 'following libvirt events');
      this.emit('spawn', { pid: child.pid ?? 0, restarts: this.restarts });
    });
    child.on('close', (code, signal) => {
      parser.flush();
      if (this.child === child) this.child = null;
      this.emit('exit', { code, signal });
      if (this.stopped) return;
      this.restarts++;
      this.log.warn(
        { code, signal, stderr: stderr.trim() },
        'virsh event exited; starting it again',
      );
      this.timer = setTimeout(() => this.spawnChild(), this.opts.restartMs ?? 1000);
    });
  }

  /** Stops following: the child is killed by its pid and awaited. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      child.once('close', () => resolve());
      child.kill('SIGTERM');
    });
  }
}
