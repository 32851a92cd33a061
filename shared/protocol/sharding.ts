/**
 * Implements: which parameter-server shard owns which tensor.
 *
 * Deterministic and identical on every host: tensors are taken in the model's spec
 * order, largest first (ties by spec order), each to the shard with the fewest elements
 * so far (ties to the lowest shard). Workers split gradients with it; shards select
 * their tensors with it.
 */
export interface Spec {
  readonly name: string
  readonly shape: readonly number[]
}

const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1)

/** shard index per tensor name. */
export const assignShards = (specs: readonly Spec[], shards: number): Map<string, number> => {
  if (!(Number.isInteger(shards) && shards >= 1)) throw new RangeError(`shards must be an integer >= 1, got ${shards}`)
  const order = specs.map((s, i) => ({ s, i, n: numel(s.shape) })).sort((a, b) => b.n - a.n || a.i - b.i)
  const load = new Array<number>(shards).fill(0)
  const out = new Map<string, number>()
  for (const { s, n } of order) {
    let best = 0
    for (let k = 1; k < shards; k++) if (load[k] < load[best]) best = k
    load[best] += n
    out.set(s.name, best)
  }
  return out
}

/** The specs of shard `shard`, in spec order. */
export const shardSpecs = <S extends Spec>(specs: readonly S[], shards: number, shard: number): S[] => {
  const a = assignShards(specs, shards)
  return specs.filter((s) => a.get(s.name) === shard)
}
