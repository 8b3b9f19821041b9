/**
 * SIGTERM and SIGINT caught from before a daemon's start. Their default action ends the
 * process at once (signal(7)), so a stop that came while the daemon was still starting
 * (its socket already answering, its projects still being adopted) skipped the clean
 * stop: the state lock was left behind (agent/common/state-lock.ts) and nothing was
 * drained. A signal that comes before the daemon is up is kept, and acted on once it is.
 * Only the first is caught: a second one ends the process, as an operator who sends it
 * twice means.
 */
export interface StopSignals {
  /** Resolves with the first stop signal's name, at once if it has already come. */
  next(): Promise<string>;
  /** No longer caught (a start that failed: the caller returns its exit code). */
  dispose(): void;
}

export function catchStopSignals(): StopSignals {
  let got: string | undefined;
  let notify: ((sig: string) => void) | undefined;
  const handler = (sig: string) => (): void => {
    dispose();
    got = sig;
    notify?.(sig);
  };
  const term = handler('SIGTERM');
  const int = handler('SIGINT');
  function dispose(): void {
    process.off('SIGTERM', term);
    process.off('SIGINT', int);
  }
  process.on('SIGTERM', term);
  process.on('SIGINT', int);
  return {
    next: () =>
      new Promise<string>((resolve) => {
        if (got !== undefined) resolve(got);
        else notify = resolve;
      }),
    dispose,
  };
}
