-- wrk script: POST the benchmark body (from $BENCH_BODY, set by routers.py) as JSON.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or '{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}'
wrk.headers["Content-Type"] = "application/json"
if os.getenv("BENCH_AUTH") then wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_AUTH") end
