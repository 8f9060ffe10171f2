-- A persona's voice (one of the speech voices, e.g. 'nova') and the look
-- of its avatar in the web app's voice mode; '' is the default.
ALTER TABLE personas ADD COLUMN voice TEXT NOT NULL DEFAULT '';
ALTER TABLE personas ADD COLUMN look TEXT NOT NULL DEFAULT '';
