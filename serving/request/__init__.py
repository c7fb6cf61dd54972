"""The gateway's request path: named stages over one `RequestContext`, in this order.

    authenticate  the bearer key's tenant                                   authenticate.py
    parse         the body as a chat or completion request                  parse.py
    scope         the data class and the zones the data may go to           scope.py
    admit         this replica's bound, then the tenant's rate limit        admit.py
    ground        RAG: chunks retrieved in those zones, cited               ground.py
    route         the ranked targets, or the error that says why none       route.py
    protect       the PII guard: pseudonymize what targets will see         protect.py
    generate      the failover stream, up to its first chunk                generate.py
    check         restore, output guard and toxicity on the way back        check.py
    (reply)       the answer, streamed or whole, or a refusal               reply.py
    record        metrics, token settlement, the audit record               record.py

Each stage is a small class built with its collaborators (key ring, limiter, target states, guard,
trails, clock) and called with the context; it ends the request by raising a `keel.errors` error.
`pipeline.run` calls them in order and times each into `ctx.timings`. The embeddings endpoint runs
authenticate, then embed.py, and is recorded the same way.
"""
