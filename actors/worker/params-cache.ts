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
 * And what a broadcast is believed (anyone can publish on ps.<k>.version; the bundle's
 * shape, dtypes, values and job were checked before: shared/protocol/params-check.ts):
 *  - `confirmed`: per shard, the position (server id, incarnation, version) its server
 *    itself last stated — in its heartbeat, or in the reply to this actor's own pull (the
 *    reply is authoritative: it replaces whatever was confirmed);
 *  - within the confirmed incarnation a broadcast is refused (with the reason, for the
 *    caller to report) when it is not from the confirmed server id, when its version is more
 *    than MAX_AHEAD past the confirmed one, or more than STALE_SLACK behind it (a server
 *    never goes back within an incarnation);
 *  - it is believed at once when its server confirmed its version, or when it is the next
 *    version of the cache (a server broadcasts every version, in order); anything else — a
 *    jump, an incarnation nobody confirmed (a restarted server's first broadcast can precede
 *    its first heartbeat), an older one while the cache is unconfirmed — is a claim: the
 *    shard is pulled, and the reply refuses every claim past what it says (a lost broadcast's
 *    successor is simply superseded);
 *  - a pull reply below a cache that was never confirmed replaces it (the cache held a
 *    version its server never reached), and that bundle is refused;
 *  - the job's last version ends the actor only when every shard's server confirmed it
 *    (`finalState`; else those shards are pulled): one forged broadcast of version = steps
 *    no longer ends every worker.
 * Without NATS permissions a client can still forge a heartbeat and a broadcast together;
 * these rules make a single forged message, or a runaway actor, harmless.
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
  /** complete epochs behind these params (ParamsMeta.epochsDone; the evaluator's per-epoch rule). */
  readonly epochsDone?: number
  /** who sent the bundle (meta.sender, Flotilla-Id): named if a pull reply later shows it was not the server's. */
  readonly sender?: string
  readonly messageId?: string
}

/** Where a shard's server said it is. */
export interface ServerPosition {
  readonly id?: string
  readonly incarnation: number
  readonly version: number
}

/** A broadcast may run this many versions ahead of what the server last said (its heartbeat runs every heartbeatMs). */
export const MAX_AHEAD = 64
/** A broadcast this many versions behind the cache (same incarnation) is refused: pulls and broadcasts may cross by a few. */
export const STALE_SLACK = 4
/** An incarnation is a start time (ms): one this far past the receiver's clock is refused. */
export const INCARNATION_SKEW_MS = 3_600_000

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
  /** per shard, what its server itself last said (heartbeat or pull reply). */
  readonly confirmed: Map<number, ServerPosition>
  /** per shard, broadcasts not believed yet (past the next version, or of an unconfirmed incarnation): a pull reply judges them. */
  readonly claims: Map<number, ReadonlyArray<{ readonly shard: number; readonly incarnation: number; readonly version: number; readonly sender?: string; readonly messageId?: string }>>
}

/** A fresh cache part (spread into a reducer's initial state). */
export const emptyCache = () => ({ cache: new Map<number, CachedShard>(), pulling: new Set<number>(), restartIncarnation: 0, restartSeenAt: -Infinity, confirmed: new Map<number, ServerPosition>(), claims: new Map() })

export interface Pull {
  readonly _tag: "Pull"
  readonly shard: number
  readonly minVersion: number
}

/** The params acceptance rule: a newer version of one incarnation, or any version of a newer incarnation. */
export const isNewer = (cur: { readonly incarnation: number; readonly version: number } | undefined, incarnation: number, version: number) =>
  !cur || incarnation > cur.incarnation || (incarnation === cur.incarnation && version > cur.version)

/** A params bundle of a shard, as the shell decoded and checked it (what is cached, and where it came from). */
export interface ParamsIn extends CachedShard {
  readonly shard: number
  /** a broadcast on ps.<k>.version (default), or the reply to this actor's own pull. */
  readonly source?: "broadcast" | "pull"
}

/** A params bundle refused: who sent it, and why (the shell reports it on `errors`). */
export interface Refusal {
  readonly shard: number
  readonly version: number
  readonly sender?: string
  readonly messageId?: string
  readonly reason: string
}

/**
 * What became of a params bundle of `shard` (`got`): "stale" (not newer: ignored),
 * "newer", "restarted" (a newer incarnation replaced the cache), "unconfirmed" (not
 * believed yet: pull the shard; the claim is kept and judged by the reply), "refused";
 * and every bundle refused now (`refusals`: this one, or, for a pull reply, the claims it
 * disproves and a cached bundle it corrects).
 */
export interface Received {
  readonly got: "stale" | "newer" | "restarted" | "unconfirmed" | "refused"
  readonly refusals: readonly Refusal[]
}

/** Claims kept per shard until a pull reply judges them; past this, a new one is refused at once. */
export const MAX_CLAIMS = 16

/** A heartbeat or pull reply of `shard`'s server (`authoritative`: the reply to our pull). */
export const serverSaid = (c: ParamsCache, shard: number, at: ServerPosition, now: number, authoritative = false): void => {
  if (at.incarnation > now + INCARNATION_SKEW_MS) return
  const cur = c.confirmed.get(shard)
  if (authoritative || isNewer(cur, at.incarnation, at.version) || (cur?.incarnation === at.incarnation && cur.version === at.version && cur.id === undefined)) c.confirmed.set(shard, at)
}

const refusalOf = (e: { readonly shard: number; readonly version: number; readonly sender?: string; readonly messageId?: string }, reason: string): Refusal => ({
  shard: e.shard, version: e.version, reason, ...(e.sender !== undefined ? { sender: e.sender } : {}), ...(e.messageId !== undefined ? { messageId: e.messageId } : {})
})

/**
 * Why a broadcast is not believed (a reason), "unconfirmed" (a pull decides), or
 * undefined (believed: the next version of the cache, or one its server confirmed).
 */
const broadcastProblem = (c: ParamsCache, e: ParamsIn): string | "unconfirmed" | undefined => {
  const conf = c.confirmed.get(e.shard)
  if (conf === undefined || e.incarnation > conf.incarnation) return "unconfirmed"
  if (e.incarnation < conf.incarnation) return undefined // an older process: isNewer ignores it
  const at = `params of shard ${e.shard} at version ${e.version}`
  if (conf.id !== undefined && e.sender !== undefined && e.sender !== conf.id) return `params of shard ${e.shard} from ${e.sender}, but its server (incarnation ${conf.incarnation}) is ${conf.id}`
  if (e.version > conf.version + MAX_AHEAD) return `${at}, ${e.version - conf.version} past what its server last said (version ${conf.version}); at most ${MAX_AHEAD}`
  if (e.version < conf.version - STALE_SLACK) return `${at}, behind version ${conf.version} its server last said (a server never goes back)`
  const cur = c.cache.get(e.shard)
  if (cur === undefined || cur.incarnation !== e.incarnation || e.version <= conf.version) return undefined
  // past what the server confirmed: believed only as the next version of the cache (each version is broadcast, in order)
  if (e.version > cur.version + 1) return "unconfirmed"
  // an older one while the cache itself is unconfirmed: which one is the server's, a pull says
  if (e.version < cur.version && cur.version > conf.version) return "unconfirmed"
  return undefined
}

export const receiveParams = (c: ParamsCache, e: ParamsIn, now: number): Received => {
  const cur = c.cache.get(e.shard)
  const before = c.confirmed.get(e.shard)
  const refusals: Refusal[] = []
  if (e.source === "pull") {
    c.pulling.delete(e.shard)
    serverSaid(c, e.shard, { ...(e.sender !== undefined ? { id: e.sender } : {}), incarnation: e.incarnation, version: e.version }, now, true)
    // the claims this reply disproves: a version (or incarnation) the server has not reached
    for (const x of c.claims.get(e.shard) ?? []) {
      if (x.incarnation > e.incarnation || (x.incarnation === e.incarnation && x.version > e.version)) {
        refusals.push(refusalOf(x, `params of shard ${e.shard} at version ${x.version} (incarnation ${x.incarnation}) are not its server's: its pull reply says version ${e.version} (incarnation ${e.incarnation})`))
      }
    }
    c.claims.delete(e.shard)
  } else {
    const bad = broadcastProblem(c, e)
    if (bad === "unconfirmed") {
      const claims = c.claims.get(e.shard) ?? []
      if (claims.length >= MAX_CLAIMS) return { got: "refused", refusals: [refusalOf(e, `params of shard ${e.shard} at version ${e.version}: ${MAX_CLAIMS} unconfirmed bundles of it are waiting for its server already`)] }
      c.claims.set(e.shard, [...claims, { shard: e.shard, incarnation: e.incarnation, version: e.version, ...(e.sender !== undefined ? { sender: e.sender } : {}), ...(e.messageId !== undefined ? { messageId: e.messageId } : {}) }])
      return { got: "unconfirmed", refusals }
    }
    if (bad !== undefined) return { got: "refused", refusals: [refusalOf(e, bad)] }
  }
  // the server says it is behind a cache it never confirmed: that cache was not its params
  const behind = e.source === "pull" && cur !== undefined && cur.incarnation === e.incarnation && e.version < cur.version && !(before !== undefined && before.incarnation === cur.incarnation && before.version >= cur.version)
  if (!behind && !isNewer(cur, e.incarnation, e.version)) return { got: "stale", refusals }
  c.cache.set(e.shard, {
    incarnation: e.incarnation, version: e.version, params: e.params,
    ...(e.codec !== undefined ? { codec: e.codec } : {}), ...(e.run !== undefined ? { run: e.run } : {}), ...(e.epochsDone !== undefined ? { epochsDone: e.epochsDone } : {}),
    ...(e.sender !== undefined ? { sender: e.sender } : {}), ...(e.messageId !== undefined ? { messageId: e.messageId } : {})
  })
  if (behind) {
    refusals.push(refusalOf({ ...cur, shard: e.shard }, `params of shard ${e.shard} at version ${cur.version} were not its server's: its pull reply says version ${e.version} (incarnation ${e.incarnation})`))
  }
  if (cur === undefined || e.incarnation <= cur.incarnation) return { got: "newer", refusals }
  c.restartIncarnation = Math.max(c.restartIncarnation, e.incarnation)
  c.restartSeenAt = now
  return { got: "restarted", refusals }
}

/** The RefuseParams effects (every reducer has this effect) of what `receiveParams` refused. */
export const refusals = (r: Received) => r.refusals.map((x) => ({ _tag: "RefuseParams" as const, ...x }))

/**
 * The start of every reducer's ParamsReceived: the refusals, and for an unconfirmed claim a
 * pull of its shard, go to `emit`; "stop" when nothing more follows (refused, unconfirmed).
 */
export const takeParams = (c: ParamsCache, e: ParamsIn, now: number, emit: (x: Pull | ReturnType<typeof refusals>[number]) => void): "newer" | "restarted" | "stale" | "stop" => {
  const r = receiveParams(c, e, now)
  for (const x of refusals(r)) emit(x)
  if (r.got === "refused") return "stop"
  if (r.got === "unconfirmed") {
    const p = pullShard(c, e.shard)
    if (p) emit(p)
    return "stop"
  }
  return r.got
}

/** Each cached shard's run (ParamsMeta.run), what a sender's saved residuals are tagged with (sender-state.ts). */
export const runsOf = (c: ParamsCache): Map<number, number> =>
  new Map([...c.cache].flatMap(([k, x]) => (x.run === undefined ? [] : [[k, x.run] as const])))

/** Pull `shard` unless a pull of it is under way. */
export const pullShard = (c: ParamsCache, shard: number): Pull | undefined => {
  if (c.pulling.has(shard)) return undefined
  c.pulling.add(shard)
  c.stats.pulls++
  return { _tag: "Pull", shard, minVersion: (c.cache.get(shard)?.version ?? -1) + 1 }
}

/**
 * The job's last version (`steps`): `done` when every one of `shards` is cached at it and
 * its server confirmed it (heartbeat or pull reply, same incarnation); otherwise a pull
 * of each shard cached at it but not confirmed.
 */
export const finalState = (c: ParamsCache, shards: readonly number[], steps: number): { readonly done: boolean; readonly pulls: Pull[] } => {
  if (!shards.every((k) => (c.cache.get(k)?.version ?? -1) >= steps)) return { done: false, pulls: [] }
  const unconfirmed = shards.filter((k) => {
    const conf = c.confirmed.get(k)
    return !(conf !== undefined && conf.incarnation === c.cache.get(k)!.incarnation && conf.version >= steps)
  })
  if (unconfirmed.length === 0) return { done: true, pulls: [] }
  return { done: false, pulls: unconfirmed.flatMap((k) => pullShard(c, k) ?? []) }
}

/** A server's heartbeat (ServerSeen): what it says it is at, and the pull of its shard when the cache lacks that. */
export const serverSeen = (c: ParamsCache, e: { readonly shard: number; readonly incarnation: number; readonly version: number; readonly id?: string }, now: number): Pull | undefined => {
  serverSaid(c, e.shard, { ...(e.id !== undefined ? { id: e.id } : {}), incarnation: e.incarnation, version: e.version }, now)
  return pullIfBehind(c, e.shard, e.incarnation, e.version)
}

/** A parameter server's heartbeat as a ServerSeen (shard, incarnation, version, its id), or undefined (leaving, or no position in it). */
export const serverPosition = (hb: { readonly id: string; readonly state: string; readonly info?: Readonly<Record<string, string | number>> }) => {
  if (hb.state === "leaving") return undefined
  const i = hb.info ?? {}
  const [shard, incarnation, version] = [Number(i.shard), Number(i.incarnation), Number(i.version)]
  return Number.isInteger(shard) && shard >= 0 && Number.isFinite(incarnation) && Number.isInteger(version) ? { _tag: "ServerSeen" as const, shard, incarnation, version, id: hb.id } : undefined
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
