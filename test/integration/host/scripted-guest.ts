/**
 * A guest peer whose answers a test chooses: a real UnixChannelServer (the guest's own
 * transport, with `answerPings: false` as the guest agent has it) that says hello on every
 * connection and records every message the host sends. Used where a real guest agent
 * cannot be made to give the answer under test (a rejection, an outcome `failed`, a ping
 * count); the host broker, its sockets and the VM cgroups stay real.
 */
import { newMessageId, PROTOCOL_VERSION, type Message } from '../../../agent/protocol/messages';
import type { Notice, Outcome } from '../../../agent/broker/types';
import { UnixChannelServer } from '../../../agent/transport/unix';

export class ScriptedGuest {
  readonly received: Message[] = [];
  /** Answer the host's heartbeat pings (false: play a hung agent behind a live socket). */
  answerPings = true;
  opens = 0;
  /** Added to every hello (capabilities, onlineCpus, memTotal: what a real agent reports). */
  helloExtra: Partial<Extract<Message, { type: 'hello' }>> = {};
  private waiters: { match: (m: Message) => boolean; resolve: (m: Message) => void }[] = [];

  private constructor(
    readonly name: string,
    readonly channel: UnixChannelServer,
  ) {
    channel.on('open', () => {
      this.opens++;
      channel.send({
        type: 'hello',
        id: newMessageId(),
        version: PROTOCOL_VERSION,
        guest: name,
        inventory: {
          cpus: 2,
          memoryBytes: 1024 ** 3,
          projects: [{ name: 'web', priority: 100, state: 'running' }],
        },
        lastSeq: 0,
        ...this.helloExtra,
      });
    });
    channel.on('message', (m) => {
      this.received.push(m);
      if (m.type === 'ping' && this.answerPings)
        channel.send({ type: 'pong', id: newMessageId(), replyTo: m.id, t: m.t });
      for (const w of [...this.waiters])
        if (w.match(m)) {
          this.waiters.splice(this.waiters.indexOf(w), 1);
          w.resolve(m);
        }
    });
  }

  static async listen(name: string, socketPath: string): Promise<ScriptedGuest> {
    return new ScriptedGuest(
      name,
      await UnixChannelServer.listen(socketPath, { answerPings: false }),
    );
  }

  /** The next message of this type (one already received and not yet taken counts). */
  next<T extends Message['type']>(
    type: T,
    timeoutMs = 5000,
    match: (m: Extract<Message, { type: T }>) => boolean = () => true,
  ): Promise<Extract<Message, { type: T }>> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(
        () => reject(new Error(`${this.name}: no ${type} within ${timeoutMs} ms`)),
        timeoutMs,
      );
      this.waiters.push({
        match: (m) => m.type === type && match(m as Extract<Message, { type: T }>),
        resolve: (m) => {
          clearTimeout(t);
          resolve(m as Extract<Message, { type: T }>);
        },
      });
    });
  }

  send(m: Message): boolean {
    return this.channel.send(m);
  }

  ack(
    replyTo: string,
    noticeId: string,
    state: Extract<Message, { type: 'ack' }>['state'],
    error?: { code: string; message: string },
  ): void {
    this.send({
      type: 'ack',
      id: newMessageId(),
      replyTo,
      noticeId,
      state,
      ...(error ? { error } : {}),
    });
  }

  outcome(notice: Notice, status: Outcome['status'], freed = notice.change): void {
    const now = new Date().toISOString();
    this.send({
      type: 'outcome',
      id: newMessageId(),
      outcome: {
        noticeId: notice.id,
        guest: this.name,
        status,
        projects: [],
        freed,
        startedAt: now,
        finishedAt: now,
        ms: 1,
      },
    });
  }

  close(): Promise<void> {
    return this.channel.close();
  }
}
