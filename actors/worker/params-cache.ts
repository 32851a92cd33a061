/**
 * Implements: the params cache every computing actor keeps (the training worker core.ts, the
 * pipeline stage stage-core.ts, the evaluator eval-core.ts) — the rules of docs/RELIABILITY.md
 * for params, as pure functions over the cache part of a reducer's state:
 *  - a newer version of the same server incarnation replaces a shard's cache; a newer
 *    incarnation (the server restarted, or the shards rolled back) replaces it at ANY
 *    version, and is reported as a restart (the caller drops what it computed on the old one);
 *  - a server heartbeat naming a version or incarnation the cache lacks pulls that shard,
 *    one pull at a time per shard (a lost broadcast never stalls anyone), and so does the
 *    watchdog of a reducer that waited too long for params;
 *  - for LEASE_GRACE_MS after a restart, a lease of an older lease generation is handed
 *    back: the loader is rebuilding its table on the same restart.
 * No I/O, no clocks (time arrives as arguments).
 */

export interface CachedShard {
  readonly incarnation: number
  readonly version: number
  readonly params: ReadonlyMap<string, Float32Array>
  /** the codec of gradients computed on this version, as the server stamped it (absent: f32). */
  readonly codec?: string
  /** the run the server's params belong to (ParamsMeta.run). */
  readonly run?: number
}

/** After seeing a new server incarnation, leases of an older lease generation are dropped for this long. */
export const LEASE_GRACE_MS = 3_000

/** The cache part of a reducer's state. */
export interface ParamsCache {
  readonly cache: Map<number, CachedShard>
  readonly pulling: Set<number>
  /** the incarnation a shard last restarted to, and when it was seen. */
  restartIncarnation: number
  restartSeenAt: number
  readonly stats: { pulls: number }
}

export interface Pull {
  readonly _tag: "Pull"
  readonly shard: number
  readonly minVersion: number
}

/** The params acceptance rule: a newer version of one incarnation, or any version of a newer incarnation. */
export const isNewer = (cur: { readonly incarnation: number; readonly version: number } | undefined, incarnation: number, version: number) =>
  !cur || incarnation > cur.incarnation || (incarnation === cur.incarnation && version > cur.version)

/** A params bundle of `shard`: "stale" (not newer: ignored), "newer", or "restarted" (a newer incarnation replaced the cache). */
export const receiveParams = (
  c: ParamsCache,
  e: { readonly shard: number; readonly incarnation: number; readonly version: number; readonly params: ReadonlyMap<string, Float32Array>; readonly codec?: string; readonly run?: number },
  now: number
): "stale" | "newer" | "restarted" => {
  c.pulling.delete(e.shard)
  const cur = c.cache.get(e.shard)
  if (!isNewer(cur, e.incarnation, e.version)) return "stale"
  c.cache.set(e.shard, { incarnation: e.incarnation, version: e.version, params: e.params, ...(e.codec !== undefined ? { codec: e.codec } : {}), ...(e.run !== undefined ? { run: e.run } : {}) })
  if (cur === undefined || e.incarnation <= cur.incarnation) return "newer"
  c.restartIncarnation = Math.max(c.restartIncarnation, e.incarnation)
  c.restartSeenAt = now
  return "restarted"
}

/** A server heartbeat: pull the shard when it has what the cache lacks (and no pull of it is under way). */
export const pullIfBehind = (c: ParamsCache, shard: number, incarnation: number, version: number): Pull | undefined => {
  const cur = c.cache.get(shard)
  if (!isNewer(cur, incarnation, version) || c.pulling.has(shard)) return undefined
  c.pulling.add(shard)
  c.stats.pulls++
  return { _tag: "Pull", shard, minVersion: cur ? cur.version + 1 : 0 }
}

/** The watchdog: pull every one of `shards` that no pull is under way for. */
export const pullAll = (c: ParamsCache, shards: Iterable<number>): Pull[] => {
  const out: Pull[] = []
  for (const k of shards) {
    if (c.pulling.has(k)) continue
    c.pulling.add(k)
    c.stats.pulls++
    out.push({ _tag: "Pull", shard: k, minVersion: (c.cache.get(k)?.version ?? -1) + 1 })
  }
  return out
}

/** Why a lease must be handed back (leased from a table the loader built before the latest server restart), or undefined. */
export const staleLease = (c: ParamsCache, gen: number, now: number): string | undefined =>
  gen < c.restartIncarnation && now - c.restartSeenAt < LEASE_GRACE_MS ? `lease generation ${gen} predates server incarnation ${c.restartIncarnation}` : undefined
