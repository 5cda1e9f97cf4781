-- Webhook deliveries already accepted, by provider and message id: a redelivery (SNS retries, Pub/Sub
-- at-least-once) finds its row and answers 200 without new jobs. Written in the same transaction as the
-- jobs, so a delivery either left its jobs or left nothing. Pruned with finished jobs.
CREATE TABLE webhook_deliveries (
    provider    TEXT        NOT NULL,
    message_id  TEXT        NOT NULL,
    jobs        INTEGER     NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, message_id)
);

CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);
