/**
 * Which vCPUs a reclaim will unplug, for its `leavingCpus` (docs/protocol.md, "notice (host
 * → guest)"). Pure: the guest's reported online CPUs and capabilities are inputs. The
 * broker fills the field for a guest whose config asks for CPU unplug, when the reclaim
 * takes whole CPUs; a fractional one stays a quota and names none.
 */
import { pickLeavingCpus } from '../common/cpulist';
import { CAP_CPU_UNPLUG } from '../protocol/messages';

/** CPUs within a thousandth of a whole number count as whole (the protocol's precision). */
const MILLI = 1e-3;

export interface LeavingInput {
  /** The reclaim's `change.cpus`. */
  changeCpus: number;
  /** The guest's hello capabilities on this connection. */
  guestCapabilities: readonly string[];
  /** The guest's online CPUs as it last reported them (GuestReported.onlineCpus). */
  onlineCpus?: readonly number[];
}

/**
 * The CPUs to name, or undefined when the notice should name none: the guest does not take
 * `leavingCpus` (no `cpu-unplug`: it would refuse the field), it has not reported its
 * CPUs, the change is not whole CPUs, or it has too few CPUs besides CPU 0 to give.
 */
export function leavingCpusFor(o: LeavingInput): number[] | undefined {
  if (!o.guestCapabilities.includes(CAP_CPU_UNPLUG) || o.onlineCpus === undefined) return undefined;
  const whole = Math.round(o.changeCpus);
  if (whole < 1 || Math.abs(o.changeCpus - whole) > MILLI) return undefined;
  const picked = pickLeavingCpus(o.onlineCpus, whole);
  return picked.length === whole ? picked : undefined;
}
