"""Analysis of a trained model: resumable generation (`predict`), the knowledge probes (`probes`:
hazard NLL, relearning, attribution) and the evaluate command's logic (`evaluation`)."""
