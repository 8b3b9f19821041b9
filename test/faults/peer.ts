/** A raw protocol peer on a socket for tests: records every message, answers pings if asked. */
import net from 'node:net';
import { LineDecoder } from '../../agent/protocol/framing';
import type { Message } from '../../agent/protocol/messages';
import { parseMessage } from '../../agent/protocol/schemas';

export class Peer {
  readonly got: Message[] = [];
  private readonly decoder = new LineDecoder();
  private waiters: { pred: (m: Message) => boolean; resolve: (m: Message) => void }[] = [];
  closed = false;

  constructor(
    readonly sock: net.Socket,
    answerPings = true,
  ) {
    sock.on('close', () => (this.closed = true));
    sock.on('error', () => undefined);
    sock.on('data', (d: Buffer) => {
      for (const ev of this.decoder.push(d)) {
        if (ev.kind !== 'line') continue;
        const r = parseMessage(ev.line);
        if (!r.ok) continue;
        const m = r.msg;
        this.got.push(m);
        if (m.type === 'ping' && answerPings)
          this.send({ type: 'pong', id: `pong-${m.id}`, replyTo: m.id, t: m.t });
        this.waiters = this.waiters.filter((w) => (w.pred(m) ? (w.resolve(m), false) : true));
      }
    });
  }

  static async connect(path: string, answerPings = true): Promise<Peer> {
    const sock = net.connect(path);
    await new Promise<void>((resolve, reject) =>
      sock.once('connect', resolve).once('error', reject),
    );
    return new Peer(sock, answerPings);
  }

  send(m: object): void {
    this.sock.write(JSON.stringify(m) + '\n');
  }

  /** Many lines in one write: they arrive together, as a flood would. */
  flood(ms: object[]): void {
    this.sock.write(ms.map((m) => JSON.stringify(m) + '\n').join(''));
  }

  count(pred: (m: Message) => boolean): number {
    return this.got.filter(pred).length;
  }

  wait<T extends Message = Message>(
    what: string,
    pred: (m: Message) => boolean,
    ms = 20_000,
  ): Promise<T> {
    const seen = this.got.find(pred);
    if (seen) return Promise.resolve(seen as T);
    return new Promise<T>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
      this.waiters.push({
        pred,
        resolve: (m) => {
          clearTimeout(t);
          resolve(m as T);
        },
      });
    });
  }
}
