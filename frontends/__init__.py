"""llmq.frontends"""
