"""llmq.backends"""
