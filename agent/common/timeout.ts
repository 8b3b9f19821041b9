/**
 * A promise bounded in time: settles as `p` does, or rejects with `onTimeout()` after `ms`.
 * The timer is cleared either way, so a bounded call never keeps the process up. `p` itself
 * is not cancelled (the caller's AbortSignal does that where the work can be stopped).
 */
export function withTimeout<T>(p: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(onTimeout()), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(t);
        reject(e);
      },
    );
  });
}
