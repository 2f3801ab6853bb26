"""llmq.calib"""
