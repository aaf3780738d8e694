-- Idempotency-Key answers stored by releases before 3 December 2026 kept a
-- combined credential's code and QR token in clear in the response column
-- (and, before 25 November, API and claim tokens and webhook secrets), and
-- replayed them for as long as the answer was kept (history retention, a
-- year by default). The answers of the routes that return secrets lose
-- them here: a replay of one leaves them out, as a replay past
-- fleet.ReplaySecretsFor does (GET /v1/pickups/{id} shows a live code).
-- Rows with sealed set (migration 034 on) never held them. A response that
-- is not a JSON object is left as it is.
DO $$
DECLARE
    r record;
    j jsonb;
    secrets text[];
BEGIN
    FOR r IN SELECT actor, key, route, response FROM idempotency
        WHERE sealed IS NULL AND route IN ('POST /v1/credentials', 'POST /v1/tokens', 'POST /v1/claims', 'POST /v1/webhooks')
    LOOP
        BEGIN
            j := convert_from(r.response, 'UTF8')::jsonb;
        EXCEPTION WHEN others THEN
            CONTINUE;
        END;
        secrets := CASE r.route
            WHEN 'POST /v1/credentials' THEN ARRAY['code', 'qr']
            WHEN 'POST /v1/webhooks' THEN ARRAY['secret']
            ELSE ARRAY['token'] END;
        IF jsonb_typeof(j) = 'object' AND j ?| secrets THEN
            UPDATE idempotency SET response = convert_to((j - secrets)::text || E'\n', 'UTF8')
                WHERE actor = r.actor AND key = r.key;
        END IF;
    END LOOP;
END $$;
