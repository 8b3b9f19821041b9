/**
 * The NestError a promise is refused with: the tests branch on its code (docs/errors.md),
 * never on its message. Anything else it rejects with, or a promise that resolves, fails
 * the test.
 */
import { isNestError, type NestError } from '../../agent/common/errors';

export async function failure(p: Promise<unknown>): Promise<NestError> {
  try {
    await p;
  } catch (e) {
    if (isNestError(e)) return e;
    throw e;
  }
  throw new Error('expected a failure');
}
